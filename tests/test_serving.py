"""serving.py's vLLM rules against the engine's rules as read from vLLM's own model loaders (issue 29), and the
llama.cpp rules read from its source that no local model can run (issue 32; the ones run in the engine are in
tests/test_llama_cpp.py).

Each test writes the engine's rule as a small function, with the file and function it was read from
(vllm-project/vllm, the stored versions named), and checks that sleb's warning appears exactly where
that rule builds another layout than transformers does from the same config."""

import functools
import json

import pytest
import transformers as t

import sleb
import tiny
from sleb import serving

COMMON = dict(vocab_size=tiny.VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _vllm_window(config):
    # vllm/config.py (model config), ModelConfig.get_hf_config_sliding_window: None when use_sliding_window
    # is present and false, else sliding_window. That is cache_config.sliding_window.
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return getattr(config, "sliding_window", None)


def _vllm_refuses_qwen2(config) -> bool:
    # vllm/model_executor/models/qwen2.py (commit cb24295e), Qwen2Model.__init__: raises "Sliding window for
    # some but all layers is not supported" when cache_config.sliding_window is not None and
    # hasattr(config, "max_window_layers").
    return _vllm_window(config) is not None and hasattr(config, "max_window_layers")


def _problem(config, field):
    return [line for line in serving.problems(config) if line.startswith(f"{serving.VLLM}: {field}:")]


@pytest.mark.parametrize("use_sliding_window,max_window_layers", [(False, 6), (True, 6), (True, 3), (True, 0)])
def test_qwen2_sliding_window_rule(use_sliding_window, max_window_layers):
    config = t.Qwen2Config(use_sliding_window=use_sliding_window, sliding_window=8,
                           max_window_layers=max_window_layers, **SMALL, **COMMON)
    assert bool(_problem(config, "sliding_window")) == _vllm_refuses_qwen2(config)
    assert _vllm_refuses_qwen2(config) == use_sliding_window  # whatever max_window_layers says


def _vllm_qwen2_moe_windows(config) -> list:
    # vllm/model_executor/models/qwen2_moe.py (commit 002fb907), Qwen2MoeAttention.__init__ builds
    # Attention(...) with no per_layer_sliding_window, and vllm/attention/layer.py Attention.__init__ then
    # takes the model-level cache_config.sliding_window: every block gets the same window.
    return [_vllm_window(config)] * config.num_hidden_layers


def _transformers_windows(config) -> list:
    return [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]


# (use_sliding_window, max_window_layers, layer_types given, vLLM builds another model). transformers'
# Qwen2-MoE rule (configuration_qwen2_moe.py, __post_init__): block i slides when i is even, i <
# max_window_layers and use_sliding_window.
QWEN2_MOE_CASES = [(False, 3, None, False), (True, 3, None, True), (True, 0, None, True),
                   (True, 6, ["sliding_attention"] * 6, False)]


@pytest.mark.parametrize("use_sliding_window,max_window_layers,layer_types,expected", QWEN2_MOE_CASES)
def test_qwen2_moe_sliding_rule(use_sliding_window, max_window_layers, layer_types, expected):
    config = t.Qwen2MoeConfig(use_sliding_window=use_sliding_window, sliding_window=8,
                              max_window_layers=max_window_layers, layer_types=layer_types, moe_intermediate_size=16,
                              num_experts=4, num_experts_per_tok=2, **SMALL, **COMMON)
    differs = _vllm_qwen2_moe_windows(config) != _transformers_windows(config)
    assert differs == expected
    assert bool(_problem(config, "sliding_window")) == differs


def _vllm_qwen2_moe_sparse(config) -> list:
    # vllm/model_executor/models/qwen2_moe.py, Qwen2MoeDecoderLayer.__init__: block i is sparse when
    # i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0.
    dense = getattr(config, "mlp_only_layers", []) or []
    return [i not in dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
            for i in range(config.num_hidden_layers)]


def test_qwen2_moe_pruned_config_tells_vllm_the_sparse_blocks(family_dirs):
    model, _ = sleb.load(family_dirs["qwen2_moe"], device="cpu")
    sleb.remove_blocks(model, [1, 4])
    built = ["Sparse" in type(block.mlp).__name__ for block in model.model.layers]
    assert _vllm_qwen2_moe_sparse(model.config) == built and True in built and False in built


@functools.lru_cache(maxsize=1)
def _every_config() -> list:
    """(model type, config built with its defaults, [the config, its text config]) for every config class of
    the installed transformers that builds from its defaults (about 7 s)."""
    import warnings

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in list(CONFIG_MAPPING.keys()):
            try:
                config = CONFIG_MAPPING[model_type]()
                parts = list({id(config): config, id(config.get_text_config()): config.get_text_config()}.values())
            except Exception:  # a class that cannot be built from defaults alone
                continue
            found.append((model_type, config, parts))
    return found


def _configs_with(field: str) -> list:
    """(model type, config, the part holding `field`) for every config class that has the field itself or in
    its text config (vision-language ones included)."""
    return [(model_type, config, part) for model_type, config, parts in _every_config() for part in parts
            if field in vars(part)]


def test_every_family_with_mtp_layers_is_saved_as_holding_none():
    # vllm/model_executor/models/deepseek_mtp.py, DeepSeekMultiTokenPredictor.__init__ (nemotron_h_mtp.py the
    # same way): mtp_start_layer_idx = config.num_hidden_layers, num_mtp_layers = num_nextn_predict_layers;
    # their weights are looked for there. No transformers family holds them, so the config must say 0.
    found = _configs_with("num_nextn_predict_layers")
    assert {"deepseek_v3", "glm4_moe", "nemotron_h", "nemotron_h_omni"} <= {mt for mt, _, _ in found}
    for model_type, config, part in found:
        part.num_nextn_predict_layers = 1
        serving.align(config)
        assert part.num_nextn_predict_layers == 0, model_type
        assert not [line for line in serving.problems(config) if "num_nextn_predict_layers" in line], model_type


def _vllm_nemotron_h_pattern(saved: dict) -> str:
    # vllm/model_executor/models/nemotron_h.py, NemotronHModel.__init__: make_layers(len(config.
    # hybrid_override_pattern), ...) with each block's class from config.hybrid_override_pattern[idx].
    return saved["hybrid_override_pattern"]


def test_nemotron_h_pattern_is_written_where_vllm_reads_it(family_dirs, tmp_path):
    """transformers 5 derives hybrid_override_pattern from layers_block_type (a read-only property), so it is
    written into config.json beside it; inside a vision-language config it goes into the text config."""
    codes = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
    model, tokenizer = sleb.load(family_dirs["nemotron_h"], device="cpu")
    assert isinstance(type(model.config).__dict__["hybrid_override_pattern"], property)
    sleb.remove_blocks(model, [1, 4])
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "pruned"))
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert _vllm_nemotron_h_pattern(saved) == "".join(codes[kind] for kind in saved["layers_block_type"])
    assert len(_vllm_nemotron_h_pattern(saved)) == 4

    # vLLM's vision-language models build their language model from the text config they hold
    # (vllm_config.with_hf_config(config.text_config), e.g. aria.py AriaForConditionalGeneration.__init__),
    # so a vision-language Nemotron-H's pattern belongs in that sub-config of config.json.
    (_, outer, text), = [(mt, c, p) for mt, c, p in _configs_with("layers_block_type") if mt == "nemotron_h_omni"]
    key = next(name for name, value in vars(outer).items() if value is text)
    assert serving.saved_extras(outer) == {key: {"hybrid_override_pattern": text.hybrid_override_pattern}}


def _llama_cpp_gemma_scale(config) -> int:
    # llama.cpp src/models/gemma3.cpp (and gemma2.cpp), load_arch_hparams: the model type is read off the depth
    # (62 blocks: 27B; Gemma 2: 46), and f_attention_scale is 1/sqrt(n_embd / n_head) for the 27B, else
    # 1/sqrt(n_embd_head_k). The engine run of this rule is in tests/test_llama_cpp.py.
    depth_27b = {"gemma2": 46, "gemma3_text": 62}[config.model_type]
    return config.hidden_size // config.num_attention_heads if config.num_hidden_layers == depth_27b else config.head_dim


@pytest.mark.parametrize("family, depth, removed", [("gemma3_text", 62, 10), ("gemma2", 46, 8)])
def test_gemma_27b_pruned_is_warned_where_llama_cpp_scales_attention_otherwise(family, depth, removed):
    cls = t.Gemma3TextConfig if family == "gemma3_text" else t.Gemma2Config
    shape = dict(hidden_size=5376 if family == "gemma3_text" else 4608, num_attention_heads=32, head_dim=128)
    for layers in (depth, depth - removed):
        config = cls(num_hidden_layers=layers, query_pre_attn_scalar=shape["hidden_size"] // 32, **shape)
        warned = any(line.startswith(f"{serving.LLAMA_CPP}: query_pre_attn_scalar") for line in serving.problems(config))
        assert warned == (_llama_cpp_gemma_scale(config) != config.query_pre_attn_scalar) == (layers != depth)
    # Gemma 3 1B-12B: query_pre_attn_scalar = head_dim, as llama.cpp assumes at any depth but the 27B's.
    assert not serving.problems(t.Gemma3TextConfig(num_hidden_layers=20, head_dim=256, query_pre_attn_scalar=256))


def test_baichuan_at_a_depth_llama_cpp_has_no_positions_for_is_warned():
    # llama.cpp src/models/baichuan.cpp: RoPE when the type is 7B (32 blocks), ALiBi (f_max_alibi_bias 8) when
    # 13B (40 blocks); LLM_TYPE_UNKNOWN takes neither. Baichuan is a remote-code family: a plain config stands in.
    for layers, warned in ((32, False), (40, False), (28, True), (36, True)):
        config = t.PretrainedConfig(num_hidden_layers=layers)
        config.model_type = "baichuan"
        assert any(line.startswith(f"{serving.LLAMA_CPP}: num_hidden_layers") for line in serving.problems(config)) == warned
