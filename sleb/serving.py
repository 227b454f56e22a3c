"""What serving engines read from a saved config, so a pruned checkpoint tells them the layout
transformers builds, or a warning says which engine will build another one.

Engines read the layout from other fields than transformers does. Each rule below was read from the
engine's code at the version named (see ../shared/PEERS.md; the vLLM rules re-read from vLLM's
model loaders for issue 29, file and function named in tests/test_serving.py; the llama.cpp rules read
from the tree llama-cpp-python 0.3.36 vendors, and run in the engine where a local model converts,
tests/test_llama_cpp.py): `align` rewrites the
fields it reads where a value expresses the pruned layout; where none can, `problems` names the
engine and the field, and the commands print it, record it in the results JSON and write it in the
model card.
"""

from dataclasses import dataclass
from typing import Callable, Optional

VLLM = "vLLM 0.33"
LLAMA_CPP = "llama.cpp (llama-cpp-python 0.3.36)"


@dataclass(frozen=True)
class Rule:
    engine: str
    model_types: Optional[tuple]  # None: every config that has the field
    field: str
    problem: Callable  # config -> a reason the engine would build another layout, or None
    align: Optional[Callable] = None  # config -> None: write the field the engine reads, where it can


def _kinds(config, name):
    return list(getattr(config, name, None) or [])


def _mtp_problem(config):
    return None  # aligned: transformers saves no multi-token-prediction weights


def _mtp_align(config):
    # No transformers family holds its multi-token-prediction layers (DeepSeek-V3/V4, GLM-4.5, Nemotron-H,
    # Step 3.7 and the rest list them among the keys ignored on load), so none are saved; engines look
    # for num_nextn_predict_layers of them (at index num_hidden_layers + k, or under mtp.*). A family that
    # did hold them would keep them in its state dict, and the reload guard would see the rebuild lack them.
    if getattr(config, "num_nextn_predict_layers", 0):
        config.num_nextn_predict_layers = 0


def _moe_freq_problem(config):
    freq = getattr(config, "moe_layer_freq", 1)
    return None if freq in (None, 1) else f"it takes MoE blocks as those with i % moe_layer_freq == 0 ({freq})"


def _window_layers(config):
    """Qwen2's rule (transformers derives layer_types from it when a config has none): blocks below
    max_window_layers attend fully, the rest slide; the m that gives layer_types, or None."""
    kinds = _kinds(config, "layer_types")
    for m in range(len(kinds) + 1):
        if kinds == ["full_attention" if i < m else "sliding_attention" for i in range(len(kinds))]:
            return m
    return None


def _window_layers_align(config):
    kinds = _kinds(config, "layer_types")
    m = _window_layers(config)
    if len(set(kinds)) > 1 and m is not None:
        config.max_window_layers = m


def _slides(config) -> bool:
    """vLLM's model-wide window: sliding_window unless use_sliding_window says it is off
    (ModelConfig.get_hf_config_sliding_window)."""
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return False
    return getattr(config, "sliding_window", None) is not None


def _qwen2_window_problem(config):
    # Qwen2Model.__init__ raises when a window is on and the config has max_window_layers (every Qwen2
    # config has it), whatever its value.
    if _slides(config) and hasattr(config, "max_window_layers"):
        return "it refuses any Qwen2 config with a sliding window on, whatever max_window_layers says"
    return None


def _every_block_slides_problem(config):
    # Qwen2-MoE's attention takes the model-wide window (no per-block window): every block slides.
    if _slides(config) and "full_attention" in _kinds(config, "layer_types"):
        return "it slides every block by sliding_window, including the full-attention blocks of layer_types"
    return None


def _interleave(config):
    moe = set(getattr(config, "moe_layers", None) or [])
    depth = config.num_hidden_layers
    for step in range(1, depth + 2):
        if moe == {i for i in range(depth) if (i + 1) % step == 0}:
            return step
    return None


def _interleave_problem(config):
    if getattr(config, "moe_layers", None) is None or _interleave(config) is not None:
        return None
    return f"it builds MoE blocks from interleave_moe_layer_step, and no step gives moe_layers {config.moe_layers}"


def _interleave_align(config):
    step = _interleave(config)
    if step is not None and getattr(config, "moe_layers", None) is not None:
        config.interleave_moe_layer_step = step


def _parity_problem(config):
    kinds = _kinds(config, "layer_types")
    if kinds and kinds != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(kinds))]:
        return "it takes GPT-OSS's sliding blocks as the even ones (i % 2 == 0), not from layer_types"
    return None


_PATTERN = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}


def _pattern(config):
    kinds = _kinds(config, "layers_block_type")
    return "".join(_PATTERN[kind] for kind in kinds) if kinds and all(kind in _PATTERN for kind in kinds) else None


def _pattern_align(config):
    if not isinstance(getattr(type(config), "hybrid_override_pattern", None), property) and _pattern(config):
        config.hybrid_override_pattern = _pattern(config)


def _key_of(config, part):
    """The key under which `part` (a sub-config) is saved in `config`'s config.json, None for the config itself."""
    if part is config:
        return None
    return next((name for name, value in vars(config).items() if value is part), "text_config")


def saved_extras(config) -> dict:
    """Fields for config.json that the config object derives and does not save itself: transformers 5
    computes Nemotron-H's hybrid_override_pattern from layers_block_type (and reads layers_block_type
    first when both are there), while vLLM reads the pattern, from the language model's own config
    inside a vision-language model (its text_config, where the pattern is written)."""
    extras = {}
    for part in _configs(config):
        if part.model_type == "nemotron_h" and _pattern(part):
            key = _key_of(config, part)
            fields = {"hybrid_override_pattern": _pattern(part)}
            extras.update({key: fields} if key else fields)
    return extras


def llama_cpp_gemma3_kinds(depth: int) -> list:
    """The attention kinds llama.cpp gives a Gemma 3 whose GGUF holds no per-block pattern: every 6th full."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(depth)]


def _gemma_pattern_problem(config):
    # Checked in the engine (tests/test_llama_cpp.py): the converter writes no per-block pattern for Gemma 3, and
    # the engine then computes another model. sleb.llama_cpp.convert writes the pattern (layout_keys).
    kinds = _kinds(config, "layer_types")
    if kinds and kinds != llama_cpp_gemma3_kinds(len(kinds)):
        return ("its converter writes no per-block pattern, so the engine takes every 6th block as full attention; "
                "convert with sleb.llama_cpp.convert, which writes the pattern")
    return None


# The depth at which llama.cpp takes a Gemma model for the 27B and scales attention by hidden / heads; at any
# other depth it scales by head_dim (src/models/gemma2.cpp, gemma3.cpp: the model type is read off the depth).
_GEMMA_27B_DEPTH = {"gemma2": 46, "gemma3": 62, "gemma3_text": 62}


def _gemma_scale_problem(config):
    # Checked in the engine for Gemma 3 (tests/test_llama_cpp.py); no GGUF key sets the scale.
    depth, wanted = getattr(config, "num_hidden_layers", None), getattr(config, "query_pre_attn_scalar", None)
    if depth is None or wanted is None:  # a vision-language model's outer config: its text config is checked
        return None
    used = (config.hidden_size // config.num_attention_heads if depth == _GEMMA_27B_DEPTH[config.model_type]
            else config.head_dim)
    if wanted != used:
        return (f"it scales attention by 1/sqrt({used}) at {depth} blocks (read off the depth: 1/sqrt(hidden/heads) "
                f"only at {_GEMMA_27B_DEPTH[config.model_type]}), not by query_pre_attn_scalar {wanted}")
    return None


def _baichuan_positions_problem(config):
    # Read from src/models/baichuan.cpp (a remote-code family, not run here): RoPE at 32 blocks, ALiBi at 40.
    depth = getattr(config, "num_hidden_layers", None)
    if depth is not None and depth not in (32, 40):
        return f"it picks RoPE (32 blocks) or ALiBi (40 blocks) by depth, and at {depth} blocks uses neither"
    return None


def _mlp_only_problem(config):
    # Read from the converter and src/models/qwen*moe.cpp, not run: the converter takes Qwen-MoE's vocabulary
    # only from a BPE tokenizer in its table, so no locally built model converts.
    if getattr(config, "mlp_only_layers", None):
        return f"it ignores mlp_only_layers ({config.mlp_only_layers}) and builds every block as MoE"
    return None


def _nope_problem(config):
    # Read from src/models/llama4.cpp, not run (the converter takes Llama 4's vocabulary only from a BPE tokenizer
    # in its table); the step (n_no_rope_layer_step, 4) has no GGUF key, so no field can be written.
    flags = getattr(config, "no_rope_layers", None)
    if flags and list(flags) != [0 if (i + 1) % 4 == 0 else 1 for i in range(len(flags))]:
        return "it takes Llama 4's NoPE blocks as every 4th, not from no_rope_layers"
    return None


RULES = (
    Rule(VLLM, None, "num_nextn_predict_layers", _mtp_problem, _mtp_align),
    Rule(VLLM, ("deepseek_v3", "deepseek_v2"), "moe_layer_freq", _moe_freq_problem),
    Rule(VLLM, ("qwen2",), "sliding_window", _qwen2_window_problem, _window_layers_align),
    Rule(VLLM, ("qwen2_moe",), "sliding_window", _every_block_slides_problem),
    Rule(VLLM, ("llama4", "llama4_text"), "interleave_moe_layer_step", _interleave_problem, _interleave_align),
    Rule(VLLM, ("gpt_oss",), "layer_types", _parity_problem),
    Rule(VLLM, ("nemotron_h",), "hybrid_override_pattern", lambda config: None, _pattern_align),
    Rule(LLAMA_CPP, ("gemma3", "gemma3_text"), "layer_types", _gemma_pattern_problem),
    Rule(LLAMA_CPP, ("gemma2", "gemma3", "gemma3_text"), "query_pre_attn_scalar", _gemma_scale_problem),
    Rule(LLAMA_CPP, ("baichuan",), "num_hidden_layers", _baichuan_positions_problem),
    Rule(LLAMA_CPP, ("qwen2_moe", "qwen3_moe"), "mlp_only_layers", _mlp_only_problem),
    Rule(LLAMA_CPP, ("llama4", "llama4_text"), "no_rope_layers", _nope_problem),
)


def _configs(config):
    """The config and its text config (a vision-language model's language model has its own type)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _applies(rule: Rule, config) -> bool:
    if rule.model_types is None:
        return rule.field in vars(config)
    return config.model_type in rule.model_types


def align(config) -> None:
    """Write the fields the engines read wherever a value says what transformers builds."""
    for part in _configs(config):
        for rule in RULES:
            if _applies(rule, part) and rule.align is not None:
                rule.align(part)


def problems(config) -> list:
    """'ENGINE: FIELD: why' for every engine that would build another layout from this (aligned) config."""
    found = []
    for part in _configs(config):
        for rule in RULES:
            if _applies(rule, part):
                reason = rule.problem(part)
                if reason:
                    found.append(f"{rule.engine}: {rule.field}: {reason}")
    return found


def _written_by_sleb(problem: str) -> bool:
    # sleb writes Gemma 3's per-block pattern into every GGUF it makes (llama_cpp.layout_keys)
    return problem.startswith(f"{LLAMA_CPP}: layer_types:")


def llama_cpp_problems(config, dense=None) -> list:
    """The llama.cpp problems of a pruned config that a GGUF written by sleb still has. With `dense` (the
    config of a GGUF input, as transformers read it): only those the dense file does not have already, since
    llama.cpp runs that file as it is, whatever transformers' reading of it lacks (Gemma's attention scale)."""
    found = [p for p in problems(config) if p.startswith(LLAMA_CPP) and not _written_by_sleb(p)]
    if dense is not None:
        before = {p.split(": ")[1] for p in problems(dense) if p.startswith(LLAMA_CPP)}
        found = [p for p in found if p.split(": ")[1] not in before]
    return found


def llama_cpp_problems_at_depth(config, depth: int, from_gguf: bool = False) -> list:
    """Before a search: the llama.cpp problems that any `depth`-block model pruned from `config` will have,
    whichever blocks go (those read off the depth, or from a field no removal clears)."""
    import copy

    pruned = copy.deepcopy(config)
    for part in _configs(pruned):
        if getattr(part, "num_hidden_layers", None) is not None:
            part.num_hidden_layers = depth
        for name in ("layer_types", "no_rope_layers"):  # which blocks go decides these: checked after the search
            if getattr(part, name, None) is not None:
                setattr(part, name, None)
    return llama_cpp_problems(pruned, config if from_gguf else None)
