"""Saving a pruned model as a checkpoint that stock transformers reloads as the very same model.

Before anything is written, sleb/guard.py proves it: the model rebuilt from the config about to be
saved must compute what the model rebuilt as it was scored computes. A config that would rebuild
another model (an architecture whose layout fields sleb has not met, a layout its config cannot
express, a field read at run time that changed) stops the save with one line naming where and
what; `from_pretrained` would only warn, or say nothing. The write itself goes to a temporary
sibling that is renamed at the end, so a failed or killed save leaves nothing that looks like a
checkpoint.
"""

import contextlib
import os
import shutil
import sys
import tempfile

from sleb import guard, models, results, serving
from sleb.errors import UsageError, first_line

SENTENCEPIECE_FILE = "tokenizer.model"


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


def _save_processor(model, folder: str) -> None:
    """A vision-language model's processor (image preprocessing, chat template) goes with it where it loads."""
    if not hasattr(model.config, "vision_config"):
        return
    from transformers import AutoProcessor

    try:
        AutoProcessor.from_pretrained(model.name_or_path).save_pretrained(folder)
    except Exception as error:  # a checkpoint without processor files, or one the library cannot read
        print(f"note: no processor saved ({first_line(error, 120)}); the checkpoint holds the tokenizer only")


def _sentencepiece_model(tokenizer):
    """The source checkpoint's tokenizer.model: where the tokenizer read it, else beside its files (a local
    folder or the hub cache: some tokenizer classes load tokenizer.json and forget the SentencePiece file)."""
    from huggingface_hub import try_to_load_from_cache

    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and source.endswith(".model") and os.path.isfile(source):
        return source
    name = getattr(tokenizer, "name_or_path", "") or ""
    local = os.path.join(os.path.expanduser(name), SENTENCEPIECE_FILE)
    if os.path.isfile(local):
        return local
    if name and not os.path.isdir(os.path.expanduser(name)) and name.count("/") == 1:
        cached = try_to_load_from_cache(name, SENTENCEPIECE_FILE)
        return cached if isinstance(cached, str) else None
    return None


def _keep_sentencepiece_model(tokenizer, folder: str) -> None:
    """transformers 5 saves a SentencePiece tokenizer as tokenizer.json only; converters such as llama.cpp's
    read the tokenizer.model the source checkpoint had, so it goes along unchanged."""
    source = _sentencepiece_model(tokenizer)
    target = os.path.join(folder, SENTENCEPIECE_FILE)
    if source is not None and not os.path.exists(target):
        shutil.copyfile(source, target)


@contextlib.contextmanager
def atomic_directory(directory: str, card=None):
    """A temporary sibling of `directory` to write a checkpoint into; renamed to `directory` (with `card` as
    README.md) when the block ends, removed when it fails: a failed or killed save leaves no
    complete-looking directory. An OSError is one line."""
    from safetensors import SafetensorError

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.partial-")
        os.chmod(tmp, 0o777 & ~results.umask())  # mkdtemp makes it owner-only; a checkpoint is for sharing
        yield tmp
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


def save(model, tokenizer, directory: str, card=None) -> guard.Verdict:
    """save_pretrained into a temporary sibling, then rename (atomic_directory). `card` (a huggingface_hub
    ModelCard, or a function of the guard's warning lines returning one) is written as README.md. Returns
    what the guard found."""
    serving.align(model.config)
    verdict = guard.check(model)
    for line in verdict.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if callable(card):
        card = card(verdict.warnings)
    directory = os.path.abspath(directory)
    with atomic_directory(directory, card) as tmp:
        with models.use_cache(model, True):  # the saved config should generate with its KV cache
            model.save_pretrained(tmp)
        extras = serving.saved_extras(model.config)
        if extras:
            guard.add_to_config(os.path.join(tmp, "config.json"), extras)
        tokenizer.save_pretrained(tmp)
        _keep_sentencepiece_model(tokenizer, tmp)
        _save_processor(model, tmp)
    print(f"model saved to {directory}")
    return verdict
