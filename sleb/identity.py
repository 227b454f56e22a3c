"""A run's fingerprint, so a resumed run can prove it continues the same one.

A resumed search or healing run continues numbers computed earlier; if anything that decides them
changed (other weights at the same path, another dtype or device, other calibration text under the
same file name, other blocks removed, another library version), the two halves would be spliced
silently. A run records its fingerprint; a resume compares it field by field and names the first
that changed.

Weights are recognised by content without reading a 140 GB model end to end: a hub model by the
commit of its cached snapshot; a local file by its size, its safetensors header (every tensor's
name, dtype, shape and offset) and a hash of SAMPLES byte ranges spread evenly over it, the first
and the last included. A rewrite of the same names and shapes changes the sampled bytes (random or
trained weights leave no 64 KiB range unchanged); an edit confined to bytes between samples would
pass, which is the price of not reading everything.
"""

import hashlib
import json
import os
from typing import Optional

import torch

from sleb import blocks
from sleb.models import input_device

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLES, SAMPLE_BYTES = 32, 64 * 1024  # 2 MiB read per weight file


def _sampled(path: str) -> str:
    """sha256 of the file's size, its safetensors header, and SAMPLES byte ranges spread evenly over it."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if path.endswith(".safetensors") and size >= 8:
            header = int.from_bytes(handle.read(8), "little")
            if header <= min(size, 100 * 2**20):
                digest.update(handle.read(header))
        for index in range(SAMPLES):
            handle.seek(max(0, size - SAMPLE_BYTES) * index // max(1, SAMPLES - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _weight_files(model):
    """What the weights the model was loaded from are: {"hub_commit": sha} for a cached hub model, else
    [name, content fingerprint] of each weight file in its directory ([] for a model built in memory)."""
    path = getattr(model, "name_or_path", "") or ""
    if path.lower().endswith(".gguf") and os.path.isfile(path):  # read from one GGUF file (sleb/gguf_file.py)
        return [[os.path.basename(path), _sampled(path)]]
    if path and not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            snapshot = snapshot_download(path, local_files_only=True)
        except Exception:  # not a hub id, or not cached: a model built in memory
            return []
        return {"hub_commit": os.path.basename(os.path.normpath(snapshot))}  # .../snapshots/<commit>
    if not path or not os.path.isdir(path):
        return []
    return [[name, _sampled(os.path.join(path, name))] for name in sorted(os.listdir(path))
            if name.endswith(WEIGHT_SUFFIXES)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def windows_hash(windows: torch.Tensor) -> str:
    """The token windows themselves (their shape and every id)."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    return _sha256(json.dumps(list(ids.shape)).encode() + ids.numpy().tobytes())


def model_identity(model) -> dict:
    """The model's config (hashed), its weight files' content, the blocks removed from it and what changed
    its weights since (linear maps folded in), and the dtype, device and attention implementation its
    blocks run with."""
    # dtype and library version are recorded on their own; the path it was read from is not the model
    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")
              and k not in ("dtype", "torch_dtype", "transformers_version")}
    config = json.dumps(fields, sort_keys=True, default=str)
    known = blocks.origin(model)
    return {"config_sha256": _sha256(config.encode()), "weight_files": _weight_files(model),
            "removed_blocks": known.removed, "weights_changed": list(known.weights_changed),
            "dtype": str(blocks.compute_dtype(model)).replace("torch.", ""), "device": str(input_device(model)),
            "attention": str(getattr(model.config, "_attn_implementation", None))}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from sleb.version import __version__

    found = {"sleb": __version__, "torch": torch.__version__}
    for package in ("transformers", "accelerate", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


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
                    "model.config_sha256": "the model's config",
                    "model.weight_files": "the model's weight files (their content)"}
            shown = what.get(name, name)
            if name in what:
                return f"{shown} changed"
            return f"{shown} was {old.get(name)!r}, now {new.get(name)!r}"
    return None
