"""Token windows for perplexity and calibration, built exactly as the paper's code builds them.

Evaluation: the split's rows are joined, tokenized once (with the tokenizer's own special tokens),
cut into non-overlapping windows of `seqlen`, and the remainder is dropped.
Calibration: the train split is shuffled with `datasets`' `Dataset.shuffle(seed=seed)` (the paper's
call, so the same rows are picked), the first `nsamples` rows are joined and handled the same way.

Data set names: wikitext2, c4, ptb, demo (built in, offline), file:PATH (.txt lines or .jsonl
records with a "text" field, or a "messages" conversation rendered by the tokenizer's chat template) and
self (text the dense model generates, sleb/self_text.py).
"""

import functools
import os
from dataclasses import dataclass

import torch

from sleb import hub
from sleb.errors import UsageError, first_line

# C4 evaluation keeps the first 1100 validation documents and then the first 256 windows of tokens.
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256


@dataclass(frozen=True)
class Source:
    """How to read one data set: which split rows, which text field, which separator."""

    eval_rows: callable
    train_rows: callable
    separator: str
    max_eval_windows: int = 0  # 0: all windows


def _hub(name, *args, **kwargs):
    """A loader of a hub data set; `name` is the sleb name shown in errors."""
    def load():
        hub.reach()
        _quiet_datasets()
        from datasets import load_dataset

        try:
            return load_dataset(*args, **kwargs)
        except Exception as error:  # offline: ConnectionError, OSError, DatasetNotFoundError, ...
            where = "offline, and not in the local cache" if hub.offline() else first_line(error, 200)
            raise UsageError(
                f"data set {name!r} is not available ({where}); use a local file with "
                "file:PATH (.txt or .jsonl) or the built-in demo corpus"
            ) from None
    return load


def _demo_rows(split):
    def rows():
        from datasets import Dataset

        from sleb import demo_corpus

        return Dataset.from_dict({"text": demo_corpus.texts(split)})
    return rows


def _quiet_datasets():
    # datasets' own bars ("Generating train split") would bury a one-line error; ours report progress.
    import datasets

    datasets.disable_progress_bars()


def _file_rows(path):
    def rows():
        _quiet_datasets()
        from datasets import Dataset

        if not os.path.isfile(path):
            raise UsageError(f"data file {path!r} does not exist; give file:PATH with a .txt or .jsonl file")
        # Dataset.from_text/from_json read a local file without load_dataset's hub lookups (its
        # download-count ping would touch the network for a local file).
        read = Dataset.from_json if path.endswith((".jsonl", ".json")) else Dataset.from_text
        try:
            dataset = read(path)
        except Exception as error:
            raise UsageError(f"cannot read data file {path!r}: {first_line(error, 200)}") from None
        if "text" not in dataset.column_names and "messages" not in dataset.column_names:
            raise UsageError(f"data file {path!r} has no 'text' or 'messages' field; each JSON line needs one")
        return dataset
    return rows


def _source(name: str) -> Source:
    if name == "wikitext2":
        return Source(
            eval_rows=_hub("wikitext2", "wikitext", "wikitext-2-raw-v1", split="test"),
            train_rows=_hub("wikitext2", "wikitext", "wikitext-2-raw-v1", split="train"),
            separator="\n\n",
        )
    if name == "c4":
        validation = _hub("c4", "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
        return Source(
            eval_rows=lambda: validation().select(range(C4_EVAL_DOCUMENTS)),
            train_rows=_hub("c4", "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
            separator=" ",
            max_eval_windows=C4_EVAL_WINDOWS,
        )
    if name == "ptb":
        test = _hub("ptb", "ptb_text_only", "penn_treebank", split="test")
        train = _hub("ptb", "ptb_text_only", "penn_treebank", split="train")
        return Source(
            eval_rows=lambda: test().rename_column("sentence", "text"),
            train_rows=lambda: train().rename_column("sentence", "text"),
            separator=" ",
        )
    if name == "demo":
        return Source(eval_rows=_demo_rows("test"), train_rows=_demo_rows("train"), separator="\n\n")
    if name.startswith("file:") and len(name) > len("file:"):
        rows = _file_rows(os.path.expanduser(name[len("file:"):]))
        return Source(eval_rows=rows, train_rows=rows, separator="\n\n")
    raise UsageError(f"unknown data set {name!r}; use wikitext2, c4, ptb, demo or file:PATH")


SELF = "self"  # text the dense model generates (sleb/self_text.py): calibration only, made once it is loaded


def check_dataset_name(name: str, calibration: bool = True) -> None:
    """Fail early (before loading a model) on a name that can never work."""
    if name == SELF:
        if not calibration:
            raise UsageError("--dataset self is calibration text the model generates; measure perplexity on "
                             "another set (demo, wikitext2, file:PATH)")
        return
    _source(name)
    if name.startswith("file:"):
        path = os.path.expanduser(name[len("file:"):])
        if not os.path.isfile(path):
            raise UsageError(f"data file {path!r} does not exist; give file:PATH with a .txt or .jsonl file")


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int = 0) -> torch.Tensor:
    """Tokenize once, cut into (windows, seqlen), drop the remainder."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise UsageError(f"the data holds {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                         "use more text or a smaller --seqlen")
    return ids[: count * seqlen].view(count, seqlen)


@dataclass(frozen=True)
class EvalText:
    text: str
    max_windows: int  # 0: all


def _stamp(name: str):
    """A file data set's size and modification time: a cached read never outlives a changed file."""
    if not name.startswith("file:"):
        return None
    try:
        status = os.stat(os.path.expanduser(name[len("file:"):]))
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


# The commands fetch every data set before the model loads (a missing one fails before minutes of
# loading), then build windows through the public API, which reads it again: from this cache.
@functools.lru_cache(maxsize=8)
def _eval_text(name: str, stamp) -> EvalText:
    source = _source(name)
    rows = source.eval_rows()
    if "text" not in rows.column_names:
        raise UsageError(f"{name}: perplexity is measured on a 'text' field; these records have none")
    return EvalText(source.separator.join(rows["text"]), source.max_eval_windows)


@functools.lru_cache(maxsize=8)
def _calibration_rows(name: str, nsamples: int, seed: int, stamp) -> tuple:
    """(separator, rows): texts, or conversations (lists of {"role", "content"}) from a `messages` field."""
    source = _source(name)
    rows = source.train_rows().shuffle(seed=seed)[:nsamples]
    return source.separator, tuple(rows["text"] if "text" in rows else rows["messages"])


def render(rows, tokenizer) -> list:
    """Conversations rendered by the tokenizer's chat template (as the model saw such text in training);
    plain texts as they are."""
    if not rows or isinstance(rows[0], str):
        return list(rows)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data holds 'messages' conversations but the tokenizer has no chat template; give "
                         "a 'text' field instead")
    return [tokenizer.apply_chat_template(list(messages), tokenize=False) for messages in rows]


def eval_text(name: str) -> EvalText:
    """The data set's evaluation split, joined."""
    return _eval_text(name, _stamp(name))


def calibration_text(name: str, nsamples: int, seed: int, tokenizer=None) -> str:
    """The first `nsamples` rows of the train split shuffled with `Dataset.shuffle(seed=seed)`, joined
    (conversations rendered by `tokenizer`'s chat template; without a tokenizer, only read, as a check)."""
    if name == SELF:
        return ""  # generated by the loaded model (api.calibration_windows)
    separator, rows = _calibration_rows(name, nsamples, seed, _stamp(name))
    if tokenizer is None and rows and not isinstance(rows[0], str):
        return ""
    return separator.join(render(rows, tokenizer))


def load_eval_windows(name: str, tokenizer, seqlen: int) -> torch.Tensor:
    """(windows, seqlen) token ids of the data set's evaluation split."""
    text = eval_text(name)
    return token_windows(tokenizer, text.text, seqlen, text.max_windows)


def load_calibration_windows(name: str, tokenizer, nsamples: int, seed: int, seqlen: int) -> torch.Tensor:
    """(windows, seqlen) token ids for the search."""
    return token_windows(tokenizer, calibration_text(name, nsamples, seed, tokenizer), seqlen)
