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
    raise ValueError(arch)


def make_model_dir(path, arch: str = "llama", layers: int = 6, seed: int = 0, init_std: float = 0.2) -> str:
    """Save a random model of `arch` with the tiny tokenizer to `path`; return the path.

    A larger init_std than transformers' default makes blocks matter, so candidate losses differ.
    """
    from transformers import AutoModelForCausalLM

    config = make_config(arch, layers)
    if hasattr(config, "initializer_range"):
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
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
