"""A Llama with sub-layers removed, saved as a Nemotron-NAS ("DeciLM") checkpoint: the layout vLLM's native
nemotron_nas model serves, and that transformers loads with trust_remote_code through the two small files
this package holds (configuration_decilm.py, modeling_decilm.py), copied beside the weights.

The config is the model's own Llama config with model_type "nemotron-nas", architectures
["DeciLMForCausalLM"], auto_map to those files, head_dim written out, and one `block_configs` entry per
kept block: attention {no_op, replace_with_linear, n_heads_in_group} and ffn {no_op, replace_with_linear,
ffn_mult}; ffn_mult is written where vLLM's sizing, int(2 * ffn_mult * hidden / 3) rounded up to a multiple
of 256, gives the MLP's own size back, else intermediate_size, which vLLM reads in its place. The tensors
keep the Llama names; a removed sub-layer's (and its norm's) are left out. Without trust_remote_code
transformers does not know model_type "nemotron-nas" and refuses the checkpoint.

Before the directory appears, the checkpoint is loaded back the way a user loads it and must give the
scored model's logits (the reload guard of sub-layers); otherwise nothing is written.
"""

import json
import os
import shutil

import torch

from sleb import blocks, sublayers
from sleb.errors import UsageError

FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
_PARTS = {"attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}


def check(config) -> None:
    """One line, before any work, for a model this layout cannot carry: it is a Llama with sub-layers gone."""
    text = config.get_text_config()
    if getattr(text, "model_type", None) != "llama":
        raise UsageError(f"sub-layers are saved in the Nemotron-NAS (DeciLM) layout, a Llama's; this model is "
                         f"{getattr(text, 'model_type', '?')}: evaluate it without --save_model")


def _vllm_intermediate(ffn_mult: float, hidden: int) -> int:
    size = int(2 * ffn_mult * hidden / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def block_configs(config, kept: list, parts: list) -> list:
    """One entry per kept block (original numbers `kept`), with the sub-layers `parts` marked no_op."""
    heads = config.num_attention_heads
    group = heads // (config.num_key_value_heads or heads)
    ffn_mult = config.intermediate_size * 3 / (2 * config.hidden_size)
    size = ({"ffn_mult": ffn_mult} if _vllm_intermediate(ffn_mult, config.hidden_size) == config.intermediate_size
            else {"intermediate_size": config.intermediate_size})
    gone = {(part.block, part.kind) for part in parts}
    return [{"attention": {"no_op": (block, "attn") in gone, "replace_with_linear": False, "n_heads_in_group": group},
             "ffn": {"no_op": (block, "mlp") in gone, "replace_with_linear": False, **size}} for block in kept]


def config_dict(model, parts: list) -> dict:
    config = model.config
    saved = config.to_dict()
    saved.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], auto_map=dict(AUTO_MAP),
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                 num_hidden_layers=blocks.num_blocks(model),
                 block_configs=block_configs(config, blocks.origin(model).kept, parts))
    return saved


def _weights(model, parts: list) -> dict:
    """The model's tensors but the removed sub-layers' and their norms'."""
    prefix, kept = blocks.block_path(model), blocks.origin(model).kept
    dropped = tuple(f"{prefix}.{kept.index(part.block)}.{name}." for part in parts for name in _PARTS[part.kind])
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(dropped)}


def _reload_check(model, folder: str) -> None:
    """The saved checkpoint, loaded as a user loads it, must compute the scored model's logits."""
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    ids = (torch.arange(24) * 7919 % model.config.vocab_size).unsqueeze(0).to(device)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=model.dtype).to(device)
    with torch.inference_mode():
        want, got = model(input_ids=ids).logits.float(), reloaded(input_ids=ids).logits.float()
    gap = (want - got).abs().max().item()
    if not gap <= 1e-4 * max(1.0, want.abs().max().item()):
        raise UsageError(f"the saved DeciLM checkpoint computes another model (largest logit gap {gap:.3g}); "
                         "nothing was written")


def save(model, tokenizer, directory: str, card=None) -> str:
    """Write the checkpoint atomically: it appears once it reloads to the scored logits. The sub-layers left out
    are those the model lacks (sublayers.removed_in)."""
    from sleb.checkpoint import atomic_directory

    check(model.config)
    parts = sublayers.removed_in(model)
    with atomic_directory(directory, card) as tmp:
        model.save_pretrained(tmp, state_dict=_weights(model, parts))
        with open(os.path.join(tmp, "config.json"), "w") as handle:
            json.dump(config_dict(model, parts), handle, indent=2, sort_keys=True)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
        tokenizer.save_pretrained(tmp)
        _reload_check(model, tmp)
    print(f"model saved to {directory} (Nemotron-NAS layout: load it with trust_remote_code=True)")
    return os.path.abspath(directory)
