"""What a run was run on, so a resumed run can prove it continues the same one.

A resumed search or healing run continues numbers computed earlier; if anything that decides them
changed (another checkpoint at the same path, another dtype or device, other calibration text under
the same file name, another library version), the two halves would be spliced silently. A run
records its identity; a resume compares it field by field and names the first that changed.
"""

import hashlib
import json
import os
from typing import Optional

import torch

from sleb import blocks
from sleb.models import input_device

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _weight_files(model) -> list:
    """[name, bytes] of the weight files the model was loaded from (its directory, or its hub cache)."""
    path = getattr(model, "name_or_path", "") or ""
    if path and not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=True)
        except Exception:  # not a hub id, or not cached: a model built in memory
            return []
    if not path or not os.path.isdir(path):
        return []
    return [[name, os.path.getsize(os.path.join(path, name))] for name in sorted(os.listdir(path))
            if name.endswith(WEIGHT_SUFFIXES)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def windows_hash(windows: torch.Tensor) -> str:
    """The token windows themselves (their shape and every id)."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    return _sha256(json.dumps(list(ids.shape)).encode() + ids.numpy().tobytes())


def model_identity(model) -> dict:
    """The model's config (hashed), its weight files' names and sizes, and the dtype and device its blocks
    run in."""
    # dtype and library version are recorded on their own; the path it was read from is not the model
    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")
              and k not in ("dtype", "torch_dtype", "transformers_version")}
    config = json.dumps(fields, sort_keys=True, default=str)
    return {"config_sha256": _sha256(config.encode()), "weight_files": _weight_files(model),
            "dtype": str(blocks.compute_dtype(model)).replace("torch.", ""), "device": str(input_device(model))}


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def of_run(model, windows: torch.Tensor, **settings) -> dict:
    """A run's identity: the model, the windows, the library versions and the settings that change its answer."""
    return {"model": model_identity(model), "windows_sha256": windows_hash(windows), "versions": versions(),
            "settings": settings}


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def first_difference(saved: Optional[dict], current: dict) -> Optional[str]:
    """'model.dtype was bfloat16, now float32' for the first field that changed, None when none did."""
    if not saved:
        return "it records no run identity (written by an older sleb)"
    old, new = _flat(saved), _flat(current)
    hashed = ("windows_sha256", "model.config_sha256", "model.weight_files")  # said last: the others name more
    for name in sorted(set(old) | set(new), key=lambda name: (name in hashed, name)):
        if old.get(name) != new.get(name):
            what = {"windows_sha256": "the calibration windows (the text or tokenizer behind them)",
                    "model.config_sha256": "the model's config", "model.weight_files": "the model's weight files"}
            shown = what.get(name, name)
            if name in what:
                return f"{shown} changed"
            return f"{shown} was {old.get(name)!r}, now {new.get(name)!r}"
    return None
