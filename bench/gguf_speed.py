"""Dense vs pruned speed in llama.cpp, printed as one JSON line.

With --gguf FILE (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): `python -m latency --engine llama.cpp --model_name
FILE --removal_list [..]` for each count in --counts (blocks 1..k removed: every block of these models costs
the same, so which go does not change the speed), the file against its pruned copy (kept bytes unchanged, no
conversion); prompt 1 x 256 and generation 32 + 128 new tokens, 10 repeats after 3 warm-up.

Without --gguf: a demo-sized Llama (the demo model's config: 12 blocks of hidden 256) with a SentencePiece
tokenizer trained on the demo corpus, random weights, converted by --tree's converter; 3 blocks removed.

    python -m bench.gguf_speed --gguf FILE [--counts 3,6,9] [--threads N]
    python -m bench.gguf_speed --tree /path/to/llama.cpp [--converter_python PY] [--outtype f16] [--threads N]
"""

import contextlib
import json
import os
import sys
import tempfile

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sleb import latency
from sleb.settings import LatencySettings


def demo_sized(folder: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' sentencepiece helpers, for this synthetic model only
    import tiny_gguf

    spm = tiny_gguf.train_sentencepiece(os.path.join(folder, "spm"), vocab=8192)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "sleb", "demo_model"))
    config.vocab_size, config.dtype = 8192, "float32"
    torch.manual_seed(0)
    model_dir = os.path.join(folder, "demo_sized_spm")
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_gguf.add_sentencepiece_tokenizer(model_dir, spm)
    AutoTokenizer.from_pretrained(model_dir)  # loads as users would
    return model_dir


def runs(folder: str, threads, repeats, warmup, prompt_len, generation_prompt_len, new_tokens, **source) -> dict:
    """{mode: figures} of prompt processing and generation for one dense/pruned pair."""
    found = {}
    for mode in ("prompt", "generation"):
        settings = LatencySettings(engine="llama.cpp", threads=threads, generation=mode == "generation",
                                   repeats=repeats, warmup=warmup,
                                   prompt_len=generation_prompt_len if mode == "generation" else prompt_len,
                                   new_tokens=new_tokens if mode == "generation" else None,
                                   result_folder=os.path.join(folder, mode), result_file="latency.json", **source)
        with contextlib.redirect_stdout(sys.stderr):  # the command's table; stdout holds the JSON line only
            record = latency.run(settings)
        found[mode] = {
            "sizes": record["sizes"], "threads": record["engine"]["threads"],
            "dense_tokens_per_s": round(record["dense"]["tokens_per_s"], 1),
            "pruned_tokens_per_s": round(record["pruned"]["tokens_per_s"], 1),
            "speedup": round(record["speedup"], 3), "ideal_speedup": round(record["ideal_speedup"], 3),
            "speedup_over_ideal": round(record["speedup_over_ideal"], 3)}
        found["environment"], found["llama_cpp_python"] = record["environment"], record["engine"]["llama_cpp_python"]
    return found


def main(tree: str = None, gguf: str = None, counts="3,6,9", converter_python: str = None, outtype: str = "f16",
         threads: int = None, repeats: int = 10, warmup: int = 3, prompt_len: int = 256, generation_prompt_len: int = 32,
         new_tokens: int = 128):
    sizes = dict(threads=threads, repeats=repeats, warmup=warmup, prompt_len=prompt_len,
                 generation_prompt_len=generation_prompt_len, new_tokens=new_tokens)
    if gguf is not None:
        counts = [int(c) for c in (counts.split(",") if isinstance(counts, str) else counts)]
        report = {"model": os.path.basename(gguf), "counts": {}}
        with tempfile.TemporaryDirectory() as folder:
            for k in counts:
                found = runs(os.path.join(folder, str(k)), model_name=gguf, removal_list=list(range(1, k + 1)), **sizes)
                report["environment"], report["llama_cpp_python"] = found.pop("environment"), found.pop("llama_cpp_python")
                report["counts"][k] = {"removed": list(range(1, k + 1)), **found}
        print(json.dumps(report))
        return
    if tree is None:
        raise SystemExit("pass --gguf FILE, or --tree LLAMA_CPP_TREE for the demo-sized model")
    report = {"model": "demo-sized Llama (12 blocks, hidden 256, vocabulary 8192), random weights", "outtype": outtype,
              "removed": [1, 2, 3], "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = demo_sized(folder)
        found = runs(folder, model_name=model_dir, llama_cpp=tree, converter_python=converter_python,
                     gguf_outtype=outtype, **sizes)
        report["environment"], report["llama_cpp_python"] = found.pop("environment"), found.pop("llama_cpp_python")
        report["runs"] = found
    print(json.dumps(report))


if __name__ == "__main__":
    fire.Fire(main)
