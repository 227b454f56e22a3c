"""How close llama.cpp runs a pruned GGUF to the model transformers scored: the README's and docs/serving.md's
parity table, printed as one JSON object.

    python -m bench.gguf_parity --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 256]

For each case, the logits of `--tokens` positions of held-out demo text (the test split's first documents)
from transformers (the GGUF dequantized to float32, the blocks removed) against llama.cpp's on the same ids
(float32 KV cache): mean and largest absolute difference and top-1 agreement (sleb.llama_cpp.logit_gap), for
the dense file, the pruned file sleb.save_gguf writes, and a wrong file (the neighbouring blocks kept
instead, i + 1 for each removed i). Cases: the Q4_1 file with [3, 17, 16], with blocks 10 to 18 and with
blocks 1 to 6 removed; the same three from a float32 copy of the file (every tensor dequantized by gguf-py
and written as F32, so llama.cpp's 8-bit activations for Q4_1 weights drop out). Needs the llama-cpp extra.
"""

import contextlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

import sleb
from bench import command
from sleb import blocks, demo_corpus, gguf_file, llama_cpp
from sleb.errors import UsageError

CASES = ([3, 17, 16], list(range(10, 19)), list(range(1, 7)))


def held_out_ids(tokenizer, count: int) -> list:
    ids = tokenizer(" ".join(demo_corpus.texts("test")[:40]))["input_ids"][:count]
    if len(ids) < count:
        raise UsageError(f"the held-out demo text has {len(ids)} tokens, fewer than --tokens {count}")
    return ids


def transformers_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def engine_logits(path: str, ids: list) -> np.ndarray:
    llm = llama_cpp.load(path, n_ctx=max(256, len(ids)), logits_all=True, float32_cache=True)
    try:
        return llama_cpp.logits(llm, ids)
    finally:
        llm.close()


def float32_copy(source: str, target: str) -> str:
    """Every tensor of `source` dequantized by gguf-py and written as F32, every key kept (file type set to F32)."""
    import gguf

    found = gguf.GGUFReader(source)
    arch = found.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(target, arch=arch)
    for name, value in found.fields.items():
        if name == "general.architecture" or name.startswith("GGUF."):
            continue
        kind = value.types[0]
        contents = value.contents()
        if name == "general.file_type":
            contents = gguf_file.LLAMA_FTYPES["F32"]
        writer.add_key_value(name, contents, kind, sub_type=value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in found.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _rounded(gap: dict) -> dict:
    return {"mean_abs": float(f"{gap['mean_abs']:.3g}"), "max_abs": float(f"{gap['max_abs']:.3g}"),
            "top1_agreement": round(gap["top1_agreement"], 3)}


def case(source: str, removal_list: list, tokens: int, folder: str) -> dict:
    model, tokenizer = sleb.load(source, dtype="float32", device="cpu")
    ids = held_out_ids(tokenizer, tokens)
    depth = blocks.num_blocks(model)
    dense = llama_cpp.logit_gap(transformers_logits(model, ids), engine_logits(source, ids))
    sleb.remove_blocks(model, removal_list)
    reference = transformers_logits(model, ids)
    written = sleb.save_gguf(model, tokenizer, os.path.join(folder, "pruned.gguf"), removal_list=removal_list,
                             log=lambda *args: None)
    pruned = llama_cpp.logit_gap(reference, engine_logits(written["path"], ids))
    neighbours = [i + 1 for i in removal_list]
    wrong = gguf_file.write_pruned(source, os.path.join(folder, "wrong.gguf"),
                                   [i for i in range(depth) if i not in neighbours], log=lambda *args: None)
    return {"removal_list": removal_list, "positions": len(ids), "dense": _rounded(dense), "pruned": _rounded(pruned),
            "wrong (neighbours kept)": _rounded(llama_cpp.logit_gap(reference, engine_logits(wrong["path"], ids))),
            "within_dense_gap": llama_cpp.within_gap(pruned, dense)}


def main(gguf: str, tokens: int = 256):
    if not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    llama_cpp.check_installed()
    report = {"model": os.path.basename(gguf), "tokens": tokens, "llama_cpp_python": llama_cpp.version(), "cases": []}
    # the loads' lines go to stderr: stdout holds the JSON only
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        f32 = float32_copy(gguf, os.path.join(folder, "f32.gguf"))
        for name, source in (("Q4_1", gguf), ("F32 (dequantized copy)", f32)):
            for removal_list in CASES:
                with tempfile.TemporaryDirectory(dir=folder) as work:
                    report["cases"].append({"file": name, **case(source, list(removal_list), tokens, work)})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    command(main)
