"""GGUF files in and out: read a (quantized) GGUF through transformers' own loader, and write a pruned copy
of it whose kept tensors are the source's bytes, unchanged.

In: `from_pretrained(folder, gguf_file=name)` dequantizes to the dtype asked and reads the tokenizer from
the same file. The model then still carries transformers' GGUF quantization record, which refuses
`save_pretrained` and training; the weights are plain dequantized tensors by then, so `forget_quantization`
drops it with the quantizer's own `remove_quantization_config`.

Out (`write_pruned`): gguf-py's reader and writer copy the file with
- the kept blocks' tensors renumbered 0..n-1, their bytes and quant types as they were;
- `{arch}.block_count` set, and every per-layer array key (as long as the source's depth) sliced;
- the tokenizer, chat template and every other key kept; the removal list recorded under `sleb.*`;
- a tensor whose weights the model changed (a linear map folded in, LoRA merged) quantized again to its
  source type by gguf-py (`QUANTIZED_HERE`); other types are refused in one line that names the type.
A changed tensor is one whose dequantized source, put through transformers' own tensor processor, is no
longer what the model holds; the inverse of that processor (`_to_file`) is checked by running the
processor on its output.
"""

import functools
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from sleb.errors import UsageError, first_line

REMOVAL_KEY = "sleb.removal_list"
SOURCE_DEPTH_KEY = "sleb.source_block_count"
# gguf-py writes these itself; K-quants and i-quants it only reads (llama.cpp's quantizer writes them).
QUANTIZED_HERE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# Array keys that are as long as something other than the depth, whatever their length happens to be.
NOT_PER_LAYER = ("rope.dimension_sections", "classifier.output_labels")
# llama.cpp's quantizer (`llama_model_quantize`): the file types --gguf_type names (llama_ftype in llama.h).
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
                "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}


def is_gguf(name) -> bool:
    return isinstance(name, str) and name.lower().endswith(".gguf")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def file_key(path: str) -> tuple:
    """(absolute path, size, modification time): a file rewritten in place reads as another file."""
    path = os.path.abspath(os.path.expanduser(path))
    found = os.stat(path)
    return path, found.st_size, found.st_mtime_ns


def reader(path: str):
    """gguf-py's reader of `path` (mapped, not read), or one line saying why the file is not a GGUF."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UsageError(f"no GGUF file at {path!r}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UsageError(f"{path!r} is not a GGUF file (it does not start with the GGUF magic)")
    return _parsed(file_key(path))


@functools.lru_cache(maxsize=4)
def _parsed(key: tuple):
    # Parsing a real model's metadata takes seconds (SmolLM2's 49,152 tokenizer strings: about 5 s on 2 cores)
    # and one run reads the same file several times; the reader is read-only, so one serves every caller.
    path = key[0]
    try:
        return _gguf().GGUFReader(path, "r")
    except Exception as error:  # a truncated file or a header gguf-py cannot parse
        raise UsageError(f"cannot read {path!r} as GGUF ({first_line(error, 160)}): is it complete?") from None


def field(found, key: str, default=None):
    value = found.get_field(key)
    return default if value is None else value.contents()


def architecture(found) -> str:
    return field(found, "general.architecture", "")


def source_args(path: str) -> tuple:
    """(folder, {"gguf_file": name}): what transformers' from_pretrained takes for a GGUF file."""
    path = os.path.abspath(os.path.expanduser(path))
    return os.path.dirname(path), {"gguf_file": os.path.basename(path)}


def check_readable(path: str) -> None:
    """One line for a file that is not GGUF, or whose architecture transformers cannot read."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = architecture(reader(path))
    # transformers' own aliases (load_gguf_checkpoint): these read as another name it supports
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and aliases.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UsageError(f"{path!r} holds a {arch or 'nameless'} model, an architecture transformers cannot read "
                         "from GGUF; pass a transformers checkpoint of it instead")


def forget_quantization(model, path: str) -> None:
    """After transformers dequantized a GGUF: the weights are plain tensors, so drop the quantization record
    that would refuse save_pretrained (and be written into a saved config); remember the source file."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # transformers' own undoing of the record
    text = model.config.get_text_config()
    if hasattr(text, "quantization_config"):
        del text.quantization_config
    model.name_or_path = os.path.abspath(os.path.expanduser(path))


def source_of(model) -> Optional[str]:
    """The GGUF file a model was read from, or None."""
    path = getattr(model, "name_or_path", "") or ""
    return path if is_gguf(path) and os.path.isfile(path) else None


def _block_index(name: str):
    """blk.N.rest -> (N, rest); None for a tensor outside the blocks."""
    if not name.startswith("blk."):
        return None
    number, _, rest = name[4:].partition(".")
    return (int(number), rest) if number.isdigit() else None


def _per_layer(found, arch: str, depth: int) -> list:
    """Keys of the file's per-layer arrays: array values under the architecture, as long as the depth."""
    gguf = _gguf()
    keys = []
    for name, value in found.fields.items():
        if (name.startswith(f"{arch}.") and value.types and value.types[0] == gguf.GGUFValueType.ARRAY
                and name[len(arch) + 1:] not in NOT_PER_LAYER and len(value.data) == depth):
            keys.append(name)
    return keys


def check_requantizable(path: str) -> None:
    """Before a search whose weights will change: every block tensor's type must be one gguf-py writes."""
    found = reader(path)
    others = sorted({t.tensor_type.name for t in found.tensors if _block_index(t.name) is not None
                     and len(t.shape) > 1 and t.tensor_type.name not in QUANTIZED_HERE})
    if others:
        raise UsageError(f"--save_gguf: {path!r} holds {', '.join(others)} block tensors, which only llama.cpp's "
                         f"quantizer writes; changed weights cannot be quantized back to them here (gguf-py writes "
                         f"{', '.join(QUANTIZED_HERE)}). Save with --save_model and convert, or drop the weight change")


class _Processing:
    """transformers' tensor processing of one architecture, and its inverse, for changed tensors."""

    def __init__(self, model, arch: str):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        text = model.config.get_text_config()
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=text.to_dict())
        self.names = get_gguf_hf_weights_map(model, self.processor)  # gguf name -> parameter name
        self.state = model.state_dict()
        self.heads = (getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None))

    def held(self, gguf_name: str) -> Optional[torch.Tensor]:
        name = self.names.get(gguf_name)
        return None if name is None else self.state.get(name)

    def as_loaded(self, data: np.ndarray, gguf_name: str) -> np.ndarray:
        return self.processor.process(weights=data, name=gguf_name).weights

    def to_file(self, weights: np.ndarray, gguf_name: str) -> np.ndarray:
        """The inverse of `as_loaded`: Llama's q/k row permutation, Gemma's norm offset, else the identity;
        checked by processing the result again."""
        out = weights
        heads, kv_heads = self.heads
        if type(self.processor).__name__ == "LlamaTensorProcessor" and heads and kv_heads:
            count = heads if ".attn_q." in gguf_name else kv_heads if ".attn_k." in gguf_name else None
            if count:
                half = weights.shape[0] // count // 2
                out = weights.reshape(count, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
        elif type(self.processor).__name__ == "Gemma2TensorProcessor" and "norm.weight" in gguf_name:
            out = weights + 1
        if not np.array_equal(self.as_loaded(out.copy(), gguf_name), weights):
            raise UsageError(f"--save_gguf: cannot write the changed tensor {gguf_name} back in GGUF form "
                             f"({type(self.processor).__name__}'s processing has no inverse here); use --save_model")
        return out


def _changed(processing: _Processing, tensor, gguf) -> Optional[np.ndarray]:
    """The model's weights for a source tensor when they differ from the source's (in the file's form), else None."""
    held = processing.held(tensor.name)
    if held is None:
        return None
    source = processing.as_loaded(gguf.quants.dequantize(tensor.data, tensor.tensor_type), tensor.name)
    source = torch.from_numpy(np.array(source, dtype=np.float32)).to(held.dtype)
    if source.shape == held.shape and torch.equal(source, held.detach().cpu()):
        return None
    return processing.to_file(held.detach().to("cpu", torch.float32).numpy(), tensor.name)


def write_pruned(source: str, target: str, kept: list, model=None, extra_keys: Optional[dict] = None,
                 removal_order: Optional[list] = None, log=print) -> dict:
    """Copy the GGUF `source` to `target` keeping the blocks at (original) indices `kept`, in order.
    With `model` (the pruned model read from `source`), tensors whose weights it changed are quantized again.
    `removal_order`: the removed blocks in the order they were chosen, for the record.
    `extra_keys` ({key without the arch prefix: value}) are added or replaced (llama.cpp layout keys).
    Returns {"copied": n, "requantized": [names], "block_count": n}; `target` appears only complete."""
    from sleb.blocks import in_dense_numbering

    found = reader(source)
    arch = architecture(found)
    depth = int(field(found, f"{arch}.block_count", 0))
    kept = [int(i) for i in kept]
    if not depth or any(not 0 <= i < depth for i in kept) or len(set(kept)) != len(kept):
        raise UsageError(f"{source!r}: cannot keep blocks {kept} of {depth}")
    renumber = {old: new for new, old in enumerate(kept)}
    per_layer = set(_per_layer(found, arch, depth))
    removed = [i for i in range(depth) if i not in renumber]
    if removal_order is not None and sorted(removal_order) == removed:
        removed = [int(i) for i in removal_order]  # the order the search removed them in
    # indices of the first source, so a twice-pruned file still names what its origin lost
    previous = [int(i) for i in field(found, REMOVAL_KEY) or []]
    removed_original = in_dense_numbering(previous, removed, depth)
    keys = _kept_keys(found, arch, kept, per_layer, {**_layout_keys(found, arch, depth, kept, per_layer),
                                                     **(extra_keys or {})})
    keys += _removal_keys(removed_original, int(field(found, SOURCE_DEPTH_KEY, depth + len(previous))))
    chosen, requantized = _kept_tensors(found, renumber, _Processing(model, arch) if model is not None else None)
    _write(found, target, arch, keys, chosen)
    if requantized:
        log(f"quantized again ({len(requantized)} changed tensors): {', '.join(requantized[:6])}"
            + (" ..." if len(requantized) > 6 else ""))
    log(f"GGUF written to {target}: {len(kept)} of {depth} blocks, {len(chosen) - len(requantized)} tensors copied "
        f"byte for byte")
    return {"path": os.path.abspath(os.path.expanduser(target)), "block_count": len(kept),
            "copied": len(chosen) - len(requantized), "requantized": requantized, "removal_list": removed_original}


SUBLAYER_KEY = "sleb.removed_sublayers"  # a deci file's removed attentions, as "17.attn", original numbering
_ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")


def check_deci(found, source: str, parts: list) -> None:
    """What llama.cpp's deci graph (src/models/deci.cpp) runs as scored: a Llama with whole blocks and
    attentions removed (`parts`: the sub-layers, sleb/sublayers.py's). A layer without its MLP skips its
    residual update there and would lose its attention too, and layer 0's head count sets the head size:
    both refused in one line."""
    if architecture(found) != "llama":
        raise UsageError(f"--save_gguf with sub-layers writes llama.cpp's deci layout, a Llama's; {source!r} holds "
                         f"{architecture(found) or 'a nameless'} model")
    mlp = [p for p in parts if p.kind == "mlp"]
    if mlp:
        raise UsageError(f"--save_gguf: llama.cpp's deci layers without an MLP skip their residual update and drop "
                         f"their attention too, so {mlp[0]} cannot be served as scored; remove the whole block or "
                         "only attentions")
    if any(p.block == 0 for p in parts):
        raise UsageError("--save_gguf: llama.cpp reads the head size from layer 0's head count; keep 0.attn")


def write_deci(source: str, target: str, whole: list, parts: list, log=print) -> dict:
    """The Llama GGUF `source` with the blocks `whole` and the sub-layers `parts` (attentions) removed, as
    llama.cpp's deci architecture: every llama.* key under deci.*, per-layer head counts (0 where the
    attention is gone) and feed-forward lengths, the removed attentions' tensors (and norms) left out, every
    kept tensor's bytes unchanged."""
    found = reader(source)
    check_deci(found, source, parts)
    depth = int(field(found, "llama.block_count", 0))
    kept = [i for i in range(depth) if i not in set(whole)]
    no_attention = {p.block for p in parts}
    heads, kv = int(field(found, "llama.attention.head_count")), int(field(found, "llama.attention.head_count_kv"))
    hidden, ff = int(field(found, "llama.embedding_length")), int(field(found, "llama.feed_forward_length"))
    types = _gguf().GGUFValueType
    per_layer = {"attention.head_count": [0 if i in no_attention else heads for i in kept],
                 "attention.head_count_kv": [0 if i in no_attention else kv for i in kept],
                 "feed_forward_length": [ff] * len(kept)}
    keys = []
    for name, contents, kind, sub in _kept_keys(found, "llama", kept, set(_per_layer(found, "llama", depth)), {}):
        short = name[len("llama."):] if name.startswith("llama.") else None
        if short in per_layer:
            continue
        keys.append((f"deci.{short}" if short is not None else name, contents, kind, sub))
    keys += [(f"deci.{short}", values, types.ARRAY, types.INT32) for short, values in per_layer.items()]
    head_dim = int(field(found, "llama.attention.key_length", hidden // heads))
    if field(found, "llama.attention.key_length") is None:  # written out: not read from layer 0's head count
        keys += [("deci.attention.key_length", head_dim, types.UINT32, None),
                 ("deci.attention.value_length", head_dim, types.UINT32, None)]
    if field(found, REMOVAL_KEY) or field(found, SUBLAYER_KEY):
        raise UsageError(f"--save_gguf with sub-layers starts from the dense file; {source!r} is already pruned")
    keys += _removal_keys(whole, depth)
    keys.append((SUBLAYER_KEY, [str(p) for p in parts], types.ARRAY, types.STRING))
    renumber = {old: new for new, old in enumerate(kept)}
    chosen, _ = _kept_tensors(found, renumber, None)
    gone = tuple(f"blk.{renumber[b]}.{t}" for b in no_attention for t in _ATTENTION_TENSORS)
    chosen = [entry for entry in chosen if not entry[0].startswith(gone)]
    _write(found, target, "deci", keys, chosen)
    log(f"GGUF written to {target} (llama.cpp's deci layout): {len(kept)} of {depth} blocks, {len(no_attention)} "
        f"without attention, {len(chosen)} tensors copied byte for byte")
    return {"path": os.path.abspath(os.path.expanduser(target)), "block_count": len(kept), "copied": len(chosen),
            "requantized": [], "architecture": "deci", "removal_list": list(whole) + [str(p) for p in parts]}


def mark_removed(path: str, removed: list, source_depth: int) -> None:
    """Record in the GGUF at `path` (written by llama.cpp's converter from a checkpoint sleb pruned) which blocks
    of the dense model it lacks, under the keys a copied file carries: `eval` then knows it is not the dense
    model, and `heal` what it lacks. Every other key and tensor is copied as it is."""
    found = reader(path)
    arch = architecture(found)
    depth = int(field(found, f"{arch}.block_count", 0))
    keys = _kept_keys(found, arch, list(range(depth)), set(), {}) + _removal_keys(removed, source_depth)
    chosen, _ = _kept_tensors(found, {i: i for i in range(depth)}, None)
    _write(found, path, arch, keys, chosen)


def _kept_keys(found, arch: str, kept: list, per_layer: set, extra_keys: dict) -> list:
    """(name, contents, type, sub-type) of every key of `found` the copy keeps: the depth set, per-layer arrays
    sliced to `kept`, `extra_keys` ({key without the arch prefix: value}) added or replacing, a removal record
    left for _removal_keys."""
    gguf = _gguf()
    extra = {f"{arch}.{key}": value for key, value in extra_keys.items()}
    keys = []
    for name, value in found.fields.items():
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in extra:
            continue
        if name in (REMOVAL_KEY, SOURCE_DEPTH_KEY):
            continue  # a file pruned before: its record is replaced
        kind = value.types[0]
        contents = value.contents()
        if name == f"{arch}.block_count":
            contents = len(kept)
        elif name in per_layer:
            contents = [contents[i] for i in kept]
        keys.append((name, contents, kind, value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None))
    for name, value in extra.items():
        if isinstance(value, list):
            sub = gguf.GGUFValueType.BOOL if all(isinstance(v, bool) for v in value) else gguf.GGUFValueType.INT32
            keys.append((name, value, gguf.GGUFValueType.ARRAY, sub))
        else:
            keys.append((name, value, gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.UINT32,
                         None))
    return keys


def _removal_keys(removed_original: list, source_depth: int) -> list:
    types = _gguf().GGUFValueType
    return [(REMOVAL_KEY, [int(i) for i in removed_original], types.ARRAY, types.INT32),
            (SOURCE_DEPTH_KEY, int(source_depth), types.UINT32, None)]


def _kept_tensors(found, renumber: dict, processing) -> tuple:
    """([(name, data, type)] of the kept tensors renumbered, [names quantized again]): a tensor the model
    changed (`processing` knows it) is quantized again to its source type, the rest copied as bytes."""
    gguf = _gguf()
    chosen, requantized = [], []
    for tensor in found.tensors:
        place = _block_index(tensor.name)
        if place is not None and place[0] not in renumber:
            continue
        name = tensor.name if place is None else f"blk.{renumber[place[0]]}.{place[1]}"
        data = tensor.data
        if processing is not None:
            # the pruned model's parameters are numbered as the output file's tensors are
            changed = _changed(processing, _Renamed(tensor, name), gguf)
            if changed is not None:
                kind = tensor.tensor_type.name
                if kind not in QUANTIZED_HERE:
                    raise UsageError(f"--save_gguf: {name} changed and is {kind}, which gguf-py cannot write; "
                                     f"it writes {', '.join(QUANTIZED_HERE)}. Use --save_model instead")
                data = gguf.quants.quantize(changed.astype(np.float32), tensor.tensor_type)
                requantized.append(name)
        chosen.append((name, data, tensor.tensor_type))
    return chosen, requantized


def _write(found, target: str, arch: str, keys: list, chosen: list) -> None:
    """Write `keys` and `chosen` tensors as a GGUF at `target`, through a temporary file beside it: `target`
    appears (or is replaced) only complete."""
    gguf = _gguf()
    target = os.path.abspath(os.path.expanduser(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.partial-")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(partial, arch=arch, endianess=found.endianess)
        alignment = found.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        for name, contents, kind, sub in keys:
            writer.add_key_value(name, contents, kind, sub_type=sub)
        for name, data, kind in chosen:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, data, kind in chosen:
            writer.write_tensor_data(data, tensor_endianess=found.endianess)
        writer.close()
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except OSError as error:
        raise UsageError(f"cannot write {target}: {error.strerror or first_line(error)}; nothing was written") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _layout_keys(found, arch: str, depth: int, kept: list, per_layer: set) -> dict:
    """Keys llama.cpp needs to read the kept blocks' layout where the source relies on a default: Gemma 3
    without a per-block sliding pattern is every 6th block full, which a pruned depth rarely keeps."""
    from sleb import serving

    if arch != "gemma3" or f"{arch}.attention.sliding_window_pattern" in per_layer:
        return {}
    kinds = serving.llama_cpp_gemma3_kinds(depth)
    pruned = [kinds[i] for i in kept]
    if pruned == serving.llama_cpp_gemma3_kinds(len(kept)):
        return {}
    return {"attention.sliding_window_pattern": [kind == "sliding_attention" for kind in pruned]}


class _Renamed:
    """A reader tensor under its name in the output file."""

    def __init__(self, tensor, name: str):
        self.name, self.data, self.tensor_type = name, tensor.data, tensor.tensor_type


def quantize(source: str, target: str, type_name: str, threads: int = 0) -> str:
    """llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python): `source` (a float GGUF)
    to `target` in `type_name` (Q4_K_M, Q8_0, ...). `target` appears only complete."""
    from sleb.llama_cpp import check_installed

    check_installed()
    import llama_cpp

    ftype = LLAMA_FTYPES[type_name.upper()]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".quantize-partial-")
    os.close(fd)
    try:
        status = llama_cpp.llama_model_quantize(source.encode(), partial.encode(), params)
        if status != 0:
            raise UsageError(f"llama.cpp's quantizer failed on {source} to {type_name} (status {status})")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def check_type(type_name: Optional[str]) -> Optional[str]:
    if type_name is None:
        return None
    if str(type_name).upper() not in LLAMA_FTYPES:
        raise UsageError(f"--gguf_type {type_name!r} is not one llama.cpp's quantizer writes; use one of "
                         f"{', '.join(LLAMA_FTYPES)}")
    return str(type_name).upper()
