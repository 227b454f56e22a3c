"""Tiny random models and a tiny tokenizer, built here and saved so tests load them through the real
`from_pretrained`. Nothing is downloaded and no model is mocked."""

import random

import torch

WORDS = ("the a block model layer token text window search remove keep loss small large first last "
         "every python data value list index order paper fast slow green blue red").split()


def sample_text(lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(lines))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,:;'\"()[]{}-_=+*/\\<>!?#@%&|~`^$":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


VOCAB = 128


def make_config(arch: str, layers: int = 6):
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig,
                              Phi3Config, Qwen2Config)
    from transformers import Gemma3TextConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8,
                                final_logit_softcapping=30.0, **common)
    if arch == "phi3":
        return Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common)
    if arch in FAMILIES or arch in REFUSED_FAMILIES or arch in COMPENSATION_FAMILIES:
        return _family_config(arch, layers)
    raise ValueError(arch)


# The architectures people prune in 2026 whose configs tie structure to block index (issue 19), each
# with the field that does it set so that it matters in 6 blocks.
FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe", "llama4", "gpt_oss", "nemotron_h", "jamba",
            "lfm2", "qwen3_next", "smollm3", "gemma3_vl", "qwen2_5_vl",
            # issue 26: more layouts from transformers' model list
            "ernie4_5_moe", "bamba", "granitemoehybrid", "falcon_h1", "gemma2", "cohere2", "minimax",
            # issue 29: per-layer config overrides (transformers 5's heterogeneous configs)
            "gemma4")
VISION_FAMILIES = ("gemma3_vl", "qwen2_5_vl")
# Dense families the compensation tests add (issue 30): blocks that end in a dropout, an in-place add and a
# residual multiplier.
COMPENSATION_FAMILIES = ("stablelm", "phi", "falcon", "granite")
# Families whose blocks sleb cannot remove, each refused in one line before any search (issue 29).
REFUSED_FAMILIES = {"zamba2": "with block 1 skipped its forward fails",  # shared attention mapped by block index
                    "gemma3n": "holds per-block weights outside the blocks",  # per-layer input embeddings
                    "gemma4_ple": "holds per-block weights outside the blocks"}


def _family_config(arch: str, layers: int):
    import transformers as t

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    attention = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     num_hidden_layers=layers)
    moe = dict(moe_intermediate_size=16, num_experts_per_tok=2)
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "qwen3_moe":  # blocks 0 and 3 dense by index list
        return t.Qwen3MoeConfig(intermediate_size=64, num_experts=4, mlp_only_layers=[0, 3], head_dim=8,
                                **moe, **attention, **common)
    if arch == "qwen2_moe":  # every second block sparse by rule
        return t.Qwen2MoeConfig(intermediate_size=64, shared_expert_intermediate_size=32, num_experts=4,
                                decoder_sparse_step=2, **moe, **attention, **common)
    if arch == "deepseek_v3":  # first two blocks dense by rule; MLA attention
        return t.DeepseekV3Config(intermediate_size=64, n_routed_experts=4, n_shared_experts=1, n_group=1,
                                  topk_group=1, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_parameters=default_rope,
                                  **moe, **{**attention, "num_key_value_heads": 4}, **common)
    if arch == "glm4_moe":  # GLM-4.5: first block dense by rule
        return t.Glm4MoeConfig(intermediate_size=64, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                               first_k_dense_replace=1, head_dim=8, **moe, **attention, **common)
    if arch == "smollm3":  # no RoPE in every fourth block by no_rope_layers
        return t.SmolLM3Config(intermediate_size=64, no_rope_layer_interval=4, **attention, **common)
    if arch == "llama4":  # text model, MoE in every second block (interleave_moe_layer_step -> moe_layers)
        return t.Llama4TextConfig(intermediate_size=64, intermediate_size_mlp=64, num_local_experts=4,
                                  num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=8,
                                  attention_chunk_size=16, **attention, **common)
    if arch == "gpt_oss":  # sliding and full attention by layer_types, attention sinks
        return t.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                              sliding_window=8, **attention, **common)
    if arch == "nemotron_h":  # Mamba, MLP, attention and MoE blocks by layers_block_type
        attention.pop("num_hidden_layers")
        kinds = ["mamba", "mlp", "attention", "mamba", "moe", "attention"]
        return t.NemotronHConfig(layers_block_type=[kinds[i % len(kinds)] for i in range(layers)],
                                 intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                                 n_groups=1, conv_kernel=4, n_routed_experts=4, moe_shared_expert_intermediate_size=16,
                                 n_group=1, topk_group=1, head_dim=8, **moe, **attention, **common)
    if arch == "jamba":  # one attention block by period/offset (the rest Mamba), MoE in all
        return t.JambaConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, attn_layer_period=8,
                             attn_layer_offset=2, expert_layer_period=1, expert_layer_offset=0, mamba_d_state=8,
                             mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, **attention, **common)
    if arch == "lfm2":  # attention at blocks 1 and 3, short convolutions elsewhere
        return t.Lfm2Config(intermediate_size=64, full_attn_idxs=[1, 3], conv_L_cache=3, **attention, **common)
    if arch == "qwen3_next":  # gated delta-net and full attention by layer_types; block 1 dense
        return t.Qwen3NextConfig(intermediate_size=64, shared_expert_intermediate_size=16, num_experts=4,
                                 decoder_sparse_step=1, mlp_only_layers=[1], head_dim=8, linear_num_value_heads=4,
                                 linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                 linear_conv_kernel_dim=4, full_attention_interval=3, **moe, **attention, **common)
    if arch == "ernie4_5_moe":  # MoE by an interval rule: (i + 1) % interval == 0 and start <= i <= end
        return t.Ernie4_5_MoeConfig(intermediate_size=64, moe_intermediate_size=16, moe_num_experts=4, moe_k=2,
                                    moe_layer_start_index=1, moe_layer_end_index=4, moe_layer_interval=2,
                                    moe_num_shared_experts=1, head_dim=8, **attention, **common)
    if arch == "bamba":  # attention blocks by an index list (attn_layer_indices), Mamba elsewhere
        return t.BambaConfig(intermediate_size=64, attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_head=16,
                             mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
                             **attention, **common)
    if arch == "granitemoehybrid":  # Mamba and attention by layer_types, MoE everywhere, shared MLP
        kinds = ["mamba", "attention", "mamba", "attention", "mamba", "attention"]
        return t.GraniteMoeHybridConfig(intermediate_size=64, shared_intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2, layer_types=[kinds[i % 6] for i in range(layers)],
                                        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                                        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, **attention, **common)
    if arch == "falcon_h1":  # attention and Mamba side by side in every block, per-block multipliers
        return t.FalconH1Config(intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=8,
                                mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, head_dim=8,
                                **attention, **common)
    if arch == "gemma2":  # norms after each sub-layer, sliding and full attention alternating by layer_types
        return t.Gemma2Config(intermediate_size=64, head_dim=8, sliding_window=8, **attention, **common)
    if arch == "cohere2":  # attention and MLP in parallel off one norm; sliding blocks by layer_types
        return t.Cohere2Config(intermediate_size=64, sliding_window=8, sliding_window_pattern=3, head_dim=8,
                               **attention, **common)
    if arch == "minimax":  # linear ("lightning") and full attention by layer_types, MoE in every block
        kinds = ["linear_attention", "full_attention"]
        return t.MiniMaxConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                               layer_types=[kinds[i % 2] for i in range(layers)], block_size=16, **attention,
                               **common)
    if arch in ("gemma4", "gemma4_ple"):  # full-attention blocks' head size by per_layer_config overrides
        return t.Gemma4TextConfig(intermediate_size=64, head_dim=8, global_head_dim=16, sliding_window=8,
                                  hidden_size_per_layer_input=8 if arch == "gemma4_ple" else 0,
                                  vocab_size_per_layer_input=VOCAB,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3),
                                  **attention, **common)
    if arch == "gemma3n":  # per-layer inputs, AltUp and KV sharing across the last blocks
        return t.Gemma3nTextConfig(intermediate_size=64, head_dim=8, sliding_window=8, vocab_size_per_layer_input=VOCAB,
                                   hidden_size_per_layer_input=8, num_kv_shared_layers=2, laurel_rank=4,
                                   altup_num_inputs=2, activation_sparsity_pattern=[0.0] * layers,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3),
                                   **attention, **common)
    if arch == "zamba2":  # Mamba blocks and hybrid blocks that share attention weights, adapters by hybrid index
        attention.pop("num_key_value_heads")
        return t.Zamba2Config(layers_block_type=["mamba", "hybrid"] * (layers // 2), mamba_d_state=8, n_mamba_heads=4,
                              mamba_expand=2, num_mem_blocks=2, chunk_size=16, intermediate_size=64, adapter_rank=4,
                              use_shared_attention_adapter=True, **attention, **common)
    if arch == "stablelm":  # a dropout after the MLP, LayerNorm, partial rotary
        return t.StableLmConfig(intermediate_size=64, **attention, **common)
    if arch == "phi":  # Phi-2: attention and MLP in parallel off one norm, one residual dropout for both
        return t.PhiConfig(intermediate_size=64, **attention, **common)
    if arch == "falcon":  # attention and MLP in parallel; the MLP output is added to in place
        return t.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=layers, new_decoder_architecture=False,
                              parallel_attn=True, alibi=False, max_position_embeddings=256, **common)
    if arch == "granite":  # each sub-layer's output scaled by residual_multiplier before the add
        return t.GraniteConfig(intermediate_size=64, residual_multiplier=0.22, **attention, **common)
    if arch == "gemma3_vl":  # Gemma3ForConditionalGeneration: SigLIP tower + projector + text model
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8, **common)
        return t.Gemma3Config(text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                              mm_tokens_per_image=4, image_token_index=120, boi_token_index=121,
                              eoi_token_index=122)
    if arch == "qwen2_5_vl":  # no causal-LM class: loaded through the image-text-to-text auto class
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256,
                    rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **common)
        return t.Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=2, hidden_size=16, intermediate_size=32,
                                  num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1], window_size=28,
                                  patch_size=14), image_token_id=120, video_token_id=121, vision_start_token_id=122)
    raise ValueError(arch)


def auto_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if arch == "qwen2_5_vl" else AutoModelForCausalLM


def make_model_dir(path, arch: str = "llama", layers: int = 6, seed: int = 0, init_std: float = 0.2) -> str:
    """Save a random model of `arch` with the tiny tokenizer to `path`; return the path.

    A larger init_std than transformers' default makes blocks matter, so candidate losses differ.
    """
    config = make_config(arch, layers)
    for sub in (config, config.get_text_config()):
        if hasattr(sub, "initializer_range"):
            sub.initializer_range = init_std
    torch.manual_seed(seed)
    model = auto_class(arch).from_config(config)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def write_text(path, lines: int = 400, seed: int = 0) -> str:
    with open(path, "w") as handle:
        handle.write(sample_text(lines, seed))
    return str(path)


ARCHS = ("llama", "mistral", "qwen2", "gemma3", "phi3", "opt", "gpt_neox", "gpt2")


def make_overflowing_model_dir(path, scale: float = 3e4) -> str:
    """A tiny Llama that is finite in float32 and bfloat16 but overflows to NaN in float16, as a
    bf16-native checkpoint can: block 2's MLP output is scaled past float16's range (65504)."""
    from transformers import AutoModelForCausalLM

    make_model_dir(path, "llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(path)
    return str(path)


def generates_alike_with_and_without_cache(model, prompt, tokens: int = 6) -> bool:
    """Greedy tokens of `model` for `prompt` are the same with its KV cache and without it."""
    with torch.inference_mode():
        cached = model.generate(prompt, max_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=tokens, do_sample=False, use_cache=False, pad_token_id=0)
    return torch.equal(cached, uncached)
