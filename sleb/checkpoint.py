"""Saving a pruned model as a checkpoint that stock transformers reloads as the very same model.

Before anything is written, the model is rebuilt from the config about to be saved (on the meta
device: no memory) and every tensor name and shape is compared with the model in hand. A config
that would rebuild another model (an architecture whose layout fields sleb has not met, or a layout
its config cannot express) stops the save with one line; `from_pretrained` would only warn and
initialise the difference at random. The write itself goes to a temporary sibling that is renamed
at the end, so a failed or killed save leaves nothing that looks like a checkpoint.
"""

import os
import shutil
import tempfile

from sleb import layout, models, results
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


def reload_differences(model) -> list:
    """'NAME (what)' for every tensor that a model rebuilt from the saved config would not load as it is."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        rebuilt = type(model)._from_config(_config_as_saved(model))
    ours, theirs = _shapes(model), _shapes(rebuilt)
    differences = [f"{name} (newly initialised)" for name in theirs if name not in ours]
    differences += [f"{name} (left unused)" for name in ours if name not in theirs]
    differences += [f"{name} (shape {ours[name]} saved, {theirs[name]} expected)" for name in ours
                    if name in theirs and ours[name] != theirs[name]]
    return differences


def check_reloads(model) -> None:
    """Raise a one-line UsageError when the saved config would rebuild a different model."""
    differences = reload_differences(model)
    if differences:
        config = layout.depth_config(model.config)
        raise UsageError(
            f"not saved: {type(model).__name__}'s config cannot describe the pruned model: rebuilt from it, "
            f"{len(differences)} tensors differ (e.g. {differences[0]}); the fields that tie blocks to their index "
            f"in {layout.describe(config)} cannot express this removal; no checkpoint written")


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

    check_reloads(model)
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.partial-")
        os.chmod(tmp, 0o777 & ~results.umask())  # mkdtemp makes it owner-only; a checkpoint is for sharing
        with models.use_cache(model, True):  # the saved config should generate with its KV cache
            model.save_pretrained(tmp)
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
