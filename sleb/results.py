"""Results files: one JSON per run, written atomically, plus a readable table on stdout."""

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import tempfile

import torch

from sleb.errors import UsageError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device=None) -> dict:
    import accelerate
    import transformers

    from sleb.version import __version__

    versions = {"sleb": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    try:
        import datasets

        versions["datasets"] = datasets.__version__
    except ImportError:
        pass
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"versions": versions, "git_hash": git_hash(), "device": device_name,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def slug(model_name: str) -> str:
    """A file-name-safe short form of a model name or path."""
    base = model_name.rstrip("/").split("/")[-1] or "model"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to result folder {folder!r} ({error.strerror}); "
                         "pass a writable --result_folder") from None


def _lock(path: str):
    """(fd, lock file) holding an exclusive lock on `path`'s lock file, or a UsageError if another run holds it.

    flock is released by the kernel when its process dies, even by kill -9, so a crash never leaves
    a claim that stops the next run; the lock file itself is removed by the run that releases it."""
    import fcntl

    lock_path = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"result file {path!r} is being written by another run (pid {holder}); wait for it "
                             "to finish or pass another --result_file") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed it between our open and our lock: take a fresh one
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd, lock_path
        os.close(fd)


@contextlib.contextmanager
def claim(folder: str, file: str, overwrite: bool = False, writer: bool = True):
    """Check, before any work, that the results file can be written, and hold it for this run.

    Yields its path. A second run aimed at the same file while this one runs stops at once with
    one line; an existing file is an error unless `overwrite` (a resumed search continues its own).
    `writer` False (a torchrun rank other than 0, which writes nothing) yields the path unclaimed."""
    path = os.path.join(folder, file)  # a .json name: OutputFlags.check_output checked it
    if not writer:
        yield path
        return
    _check_writable(folder)
    fd, lock_path = _lock(path)
    try:
        if os.path.exists(path) and not overwrite:
            raise UsageError(f"result file {path!r} exists; pass --overwrite True or another --result_file")
        yield path
    finally:
        os.unlink(lock_path)
        os.close(fd)


def to_jsonable(value):
    if dataclasses.is_dataclass(value):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str, result: dict) -> None:
    write_text(path, json.dumps(to_jsonable(result), indent=2))


def write_if_changed(path: str, text: str) -> None:
    """write_text, skipped when the file already holds `text`: an unchanged file keeps its modification time,
    so `datasets` reuses its cached copy of a task file instead of adding one per run."""
    try:
        with open(path) as handle:
            if handle.read() == text:
                return
    except OSError:
        pass
    write_text(path, text)


def write_text(path: str, text: str) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".tmp")  # never matches *.json or *.yaml
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it owner-only; a results file is for sharing
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def table(headers: list, rows: list) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
