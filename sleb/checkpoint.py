"""Saving a pruned model as a checkpoint that stock transformers reloads as the very same model.

Before anything is written, the model is rebuilt from the config about to be saved (on the meta
device: no memory) and compared with the model in hand: every tensor name and shape, then module by
module the tree, classes, plain attributes, unsaved buffers and weight sharing (`check_reloads` says
exactly what that proves). A config that would rebuild another model (an architecture whose layout
fields sleb has not met, a layout its config cannot express, a rule in the modeling code) stops the
save with one line naming where and what; `from_pretrained` would only warn, or say nothing. The
write itself goes to a temporary sibling that is renamed at the end, so a failed or killed save
leaves nothing that looks like a checkpoint.
"""

import os
import shutil
import tempfile

import torch

from sleb import layout, models, results, serving
from sleb.errors import UsageError, first_line


def check_new_directory(flag_name: str, path) -> None:
    """A directory a run will write a checkpoint to must not exist yet, or be empty."""
    if not path:
        return
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--{flag_name} directory {path!r} is not empty; choose a new directory")
    ancestor = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"--{flag_name} {path!r} lies under {ancestor!r}, which is a file; choose a directory path")


def _config_as_saved(model):
    """The config exactly as from_pretrained will read it back from config.json."""
    from transformers import AutoConfig

    folder = tempfile.mkdtemp(prefix="sleb-config-")
    try:
        model.config.save_pretrained(folder)
        return AutoConfig.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _shapes(module) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


# Small models are rebuilt for real (with random weights) where the meta device cannot build them.
REAL_REBUILD_PARAMETERS = 200_000_000
# Attributes that say how a module was used, not what it computes.
_STATE_ATTRIBUTES = {"training", "name_or_path", "warnings_issued", "is_loaded_in_4bit", "is_loaded_in_8bit",
                     "is_quantized", "quantization_method", "hf_device_map", "gradient_checkpointing"}
_PLAIN = (str, int, float, bool, type(None), torch.dtype)


def _rebuild(model):
    """The model `from_pretrained` would build from the config about to be written: on the meta device
    (no memory, any size), or for real on the CPU for a small model whose classes refuse the meta device."""
    from accelerate import init_empty_weights

    config = _config_as_saved(model)
    try:
        with init_empty_weights():
            rebuilt = type(model)._from_config(config)
    except Exception as error:
        if sum(p.numel() for p in model.parameters()) > REAL_REBUILD_PARAMETERS:
            raise UsageError(f"not saved: {type(model).__name__} cannot be rebuilt from its config on the meta device "
                             f"({first_line(error, 120)}) to check it; no checkpoint written") from None
        print(f"note: {type(model).__name__} rebuilt on the CPU to check it (the meta device refused: "
              f"{first_line(error, 80)})")
        rebuilt = type(model)._from_config(config)
    rebuilt.tie_weights()  # as from_pretrained does after loading
    return rebuilt


def _plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= 256:
        return all(isinstance(item, _PLAIN) for item in value)
    return False


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _where(name: str, block_prefix: str) -> str:
    if name.startswith(block_prefix + "."):
        index, _, rest = name[len(block_prefix) + 1:].partition(".")
        return f"block {index}" + (f" ({rest})" if rest else "")
    return name or "the model itself"


def _sharing(module) -> set:
    """Groups of parameter names that are one tensor (tied embeddings, blocks sharing weights)."""
    groups = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {tuple(sorted(names)) for names in groups.values() if len(names) > 1}


def behaviour_differences(model, rebuilt=None) -> list:
    """What a model rebuilt from the config about to be written would do differently from `model`,
    module by module: the module tree and classes, every plain attribute (strings, numbers, booleans,
    dtypes and short tuples of them: attention type, sliding window, RoPE on or off, layer_idx, expert
    counts, top-k, widths), the buffers that are not saved (computed at construction from the config,
    such as RoPE frequencies), and which parameters are one tensor. Each entry is one line."""
    from sleb import blocks

    rebuilt = rebuilt if rebuilt is not None else _rebuild(model)
    prefix = blocks.block_path(model)
    ours, theirs = dict(model.named_modules()), dict(rebuilt.named_modules())
    found = [f"{_where(name, prefix)}: a {type(ours[name]).__name__} here, none rebuilt" for name in ours
             if name not in theirs]
    found += [f"{_where(name, prefix)}: none here, a {type(theirs[name]).__name__} rebuilt" for name in theirs
              if name not in ours]
    for name, module in ours.items():
        other = theirs.get(name)
        if other is None:
            continue
        if type(module) is not type(other):
            found.append(f"{_where(name, prefix)}: a {type(module).__name__} here, a {type(other).__name__} rebuilt")
            continue
        for attribute, value in vars(module).items():
            if attribute.startswith("_") or attribute in _STATE_ATTRIBUTES or "cache" in attribute or not _plain(value):
                continue
            theirs_value = getattr(other, attribute, "<missing>")
            if _normal(value) != _normal(theirs_value):
                found.append(f"{_where(name, prefix)}: {attribute} is {value!r} here, {theirs_value!r} rebuilt")
        for buffer in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            mine, built = module._buffers.get(buffer), other._buffers.get(buffer)
            if mine is None or built is None or built.is_meta or mine.is_meta:
                continue
            if mine.shape != built.shape or not torch.allclose(mine.detach().float().cpu(), built.float().cpu(),
                                                                rtol=1e-5, atol=1e-6):
                found.append(f"{_where(name, prefix)}: the unsaved buffer {buffer} differs from the rebuilt one")
    mine, built = _sharing(model), _sharing(rebuilt)
    found += [f"parameters {', '.join(group)} are one tensor here, not rebuilt" for group in sorted(mine - built)]
    found += [f"parameters {', '.join(group)} are one tensor rebuilt, not here" for group in sorted(built - mine)]
    return found


def reload_differences(model, rebuilt=None) -> list:
    """'NAME (what)' for every tensor that a model rebuilt from the saved config would not load as it is."""
    rebuilt = rebuilt if rebuilt is not None else _rebuild(model)
    ours, theirs = _shapes(model), _shapes(rebuilt)
    differences = [f"{name} (newly initialised)" for name in theirs if name not in ours]
    differences += [f"{name} (left unused)" for name in ours if name not in theirs]
    differences += [f"{name} (shape {ours[name]} saved, {theirs[name]} expected)" for name in ours
                    if name in theirs and ours[name] != theirs[name]]
    return differences


def check_reloads(model) -> None:
    """Raise a one-line UsageError when the config about to be written would rebuild another model:
    other tensors (names, shapes), or the same tensors in modules that behave otherwise (see
    `behaviour_differences`). What this proves: the rebuilt model has this model's module tree,
    classes, plain attributes, unsaved buffers and weight sharing, so with the saved weights it runs
    the same code with the same settings. It proves nothing about code that reads the config itself
    at run time rather than an attribute set from it; the reload-logits and generate tests of the
    families cover those where they are met."""
    rebuilt = _rebuild(model)
    fields = layout.describe(layout.depth_config(model.config))
    differences = reload_differences(model, rebuilt)
    if differences:
        raise UsageError(
            f"not saved: {type(model).__name__}'s config cannot describe the pruned model: rebuilt from it, "
            f"{len(differences)} tensors differ (e.g. {differences[0]}); the fields that tie blocks to their index "
            f"in {fields} cannot express this removal; no checkpoint written")
    differences = behaviour_differences(model, rebuilt)
    if differences:
        raise UsageError(
            f"not saved: rebuilt from the config about to be written, {type(model).__name__} would not be this model: "
            f"{differences[0]}" + (f" (and {len(differences) - 1} more)" if len(differences) > 1 else "")
            + f"; the fields that tie blocks to their index in {fields} cannot express it; no checkpoint written")


def check_generates(model) -> None:
    """A short greedy generation with the KV cache and without it: a pruned hybrid model whose cache
    cannot be built (no attention block left) is refused here, not by the user's first generate. In
    float32 both must give the same tokens."""
    import warnings

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(4, device=models.input_device(model)).unsqueeze(0) + 1) % vocab
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    try:
        with torch.inference_mode(), warnings.catch_warnings(), models.use_cache(model, True):
            warnings.simplefilter("ignore")
            cached = model.generate(ids, use_cache=True, **settings)
            uncached = model.generate(ids, use_cache=False, **settings)
    except Exception as error:
        raise UsageError(f"not saved: the pruned {type(model).__name__} cannot generate ({first_line(error, 160)}); "
                         "keep a block of every kind (--keep_block_kinds True); no checkpoint written") from None
    if model.dtype == torch.float32 and not torch.equal(cached, uncached):
        raise UsageError(f"not saved: the pruned {type(model).__name__} generates other tokens with its KV cache than "
                         "without it; no checkpoint written")


def _add_to_config(path: str, fields: dict) -> None:
    if not fields:
        return
    import json

    with open(path) as handle:
        config = json.load(handle)
    config.update(fields)
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def _save_processor(model, folder: str) -> None:
    """A vision-language model's processor (image preprocessing, chat template) goes with it where it loads."""
    if not hasattr(model.config, "vision_config"):
        return
    from transformers import AutoProcessor

    try:
        AutoProcessor.from_pretrained(model.name_or_path).save_pretrained(folder)
    except Exception as error:  # a checkpoint without processor files, or one the library cannot read
        print(f"note: no processor saved ({first_line(error, 120)}); the checkpoint holds the tokenizer only")


def save(model, tokenizer, directory: str, card=None) -> None:
    """save_pretrained into a temporary sibling, then rename: a failed or killed save leaves no
    complete-looking directory. `card` (a huggingface_hub ModelCard) is written as README.md."""
    from safetensors import SafetensorError

    serving.align(model.config)
    check_reloads(model)
    check_generates(model)
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.partial-")
        os.chmod(tmp, 0o777 & ~results.umask())  # mkdtemp makes it owner-only; a checkpoint is for sharing
        with models.use_cache(model, True):  # the saved config should generate with its KV cache
            model.save_pretrained(tmp)
        _add_to_config(os.path.join(tmp, "config.json"), serving.saved_extras(model.config))
        tokenizer.save_pretrained(tmp)
        _save_processor(model, tmp)
        if card is not None:
            card.save(os.path.join(tmp, "README.md"))
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked before the run)
        os.replace(tmp, directory)
    except (OSError, SafetensorError) as error:  # a full disk, a path through a file, no permission
        reason = getattr(error, "strerror", None) or first_line(error)
        raise UsageError(f"cannot write the checkpoint to {directory}: {reason}; nothing was written") from None
    finally:
        if tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"model saved to {directory}")
