"""Building a model or a block again from a config, and reading what its modules hold.

Two checks ask "what would this config build?": the reload guard (sleb/guard.py) rebuilds the whole
model from the config about to be saved, and `blocks.rederive` rebuilds each block at its new
position. Both build on the meta device (no memory for weights; buffers, which are computed from the
config, are built for real) and compare with one reader of module state: the module tree, classes
and tensor shapes (`structure`), and the plain settings a module holds (`settings`: one definition
of a plain value for the whole project, which `layout` also uses for per-block lists).

`with_tensors` gives a rebuilt model the very tensors another model holds (assigned, not copied),
its unsaved buffers on those tensors' devices and accelerate's hooks, so the rebuild runs where the
model runs: one device, a device_map split over GPUs, or weights offloaded to CPU or disk.
"""

import copy

import torch
import torch.nn as nn

# A plain value: what a config field or a module setting holds when it says how a module computes.
PLAIN_SCALARS = (str, int, float, bool, type(None), torch.dtype)
PLAIN_SEQUENCE_LIMIT = 256  # longer lists are data (token ids, tables), not settings
# Attributes that say how a module was used or loaded, not what it computes.
USAGE_STATE = frozenset({"training", "name_or_path", "warnings_issued", "is_loaded_in_4bit", "is_loaded_in_8bit",
                         "is_quantized", "quantization_method", "hf_device_map", "gradient_checkpointing"})


def is_plain(value) -> bool:
    """A scalar setting, or a short list or tuple of them."""
    if isinstance(value, PLAIN_SCALARS):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= PLAIN_SEQUENCE_LIMIT:
        return all(isinstance(item, PLAIN_SCALARS) for item in value)
    return False


def settings(module: nn.Module) -> dict:
    """{attribute: value} of the plain settings a module holds itself (not private, not usage state,
    no caches); tuples read as lists, so a setting compares equal however it was stored."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(module).items()
            if not name.startswith("_") and name not in USAGE_STATE and "cache" not in name and is_plain(value)}


def setting_differences(module: nn.Module, other: nn.Module) -> list:
    """(attribute, this module's value, the other's) for every plain setting of `module` that `other`
    holds otherwise ("<missing>" where it has none)."""
    theirs = settings(other)
    return [(name, value, theirs.get(name, "<missing>")) for name, value in settings(module).items()
            if theirs.get(name, "<missing>") != value]


def structure(module: nn.Module) -> list:
    """(name, class, {tensor: shape}) of every module inside, in order: what a rebuild must reproduce."""
    return [(name, type(inner), {key: tuple(t.shape) for key, t in list(inner._parameters.items())
                                 + list(inner._buffers.items()) if t is not None})
            for name, inner in module.named_modules()]


def on_meta(build):
    """`build()` with its parameters on the meta device; buffers are computed for real, on the CPU."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def block_at(block: nn.Module, config, position: int):
    """A block of `block`'s class built from `config` at `position` (on the meta device), or None where
    the class is not built as Block(config, layer_idx)."""
    try:
        return on_meta(lambda: type(block)(config, position))
    except Exception:
        return None


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if not tensor.is_meta:
            return tensor.device
    executes_on = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(executes_on) if executes_on is not None else fallback


def with_tensors(rebuilt: nn.Module, model: nn.Module, device: torch.device, rename=lambda name: name) -> nn.Module:
    """`rebuilt` holding `model`'s tensors (module `name` of the model is `rename(name)` of the rebuild,
    None where it has none): parameters and saved buffers assigned (the same storage, no copy), then
    weights tied as `from_pretrained` ties them, unsaved buffers (built from the rebuild's config)
    moved to the device of the model's module (`device` where it holds none), and a copy of every
    accelerate hook, so offloaded weights load where they load in the model. Returns `rebuilt`, in
    eval mode."""
    from accelerate.hooks import add_hook_to_module

    ours = dict(model.named_modules())
    state = {}
    for key, tensor in model.state_dict().items():  # detached views of the model's tensors
        module_name, _, leaf = key.rpartition(".")
        target = rename(module_name)
        if target is not None:
            state[f"{target}.{leaf}" if target else leaf] = tensor
    rebuilt.requires_grad_(False)  # a rebuild only runs forwards; offloaded weights arrive as inference tensors
    rebuilt.load_state_dict(state, strict=False, assign=True)
    if hasattr(rebuilt, "tie_weights"):
        rebuilt.tie_weights()  # as from_pretrained does after loading
    theirs = {rename(name): module for name, module in ours.items()}
    for name, module in rebuilt.named_modules():
        source = theirs.get(name)
        where = _device_of(source, device) if source is not None else device
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            value = module._buffers.get(buffer)
            if value is not None and not value.is_meta:
                module._buffers[buffer] = value.to(where)
        hook = getattr(source, "_hf_hook", None)
        if hook is not None:
            add_hook_to_module(module, copy.copy(hook))
    return rebuilt.eval()
