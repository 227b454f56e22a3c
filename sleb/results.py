"""Results files: one JSON per run, written atomically, plus a readable table on stdout."""

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

    versions = {"python": platform.python_version(), "torch": torch.__version__,
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


def prepare_result_path(folder: str, file: str, overwrite: bool) -> str:
    """Check, before any work, that the result can be written; return its path."""
    path = os.path.join(folder, file)
    if not file.endswith(".json"):
        raise UsageError(f"--result_file {file!r} must end in .json")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"result file {path!r} exists; pass --overwrite True or another --result_file")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to result folder {folder!r} ({error.strerror}); "
                         "pass a writable --result_folder") from None
    return path


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
