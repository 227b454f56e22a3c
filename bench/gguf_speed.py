"""Dense vs pruned speed in llama.cpp on a demo-sized model (the demo model's config: Llama, 12 blocks of
hidden 256) with a SentencePiece tokenizer trained on the demo corpus, random weights (speed does not
depend on them): `python -m latency --engine llama.cpp --llama_cpp TREE`, prompt and generation, ceil(0.2 x
12) = 3 blocks removed; prompt 1 x 256, generation 32 + 128 new tokens, 10 repeats after 3 warm-up;
prints one JSON line.

    python bench/gguf_speed.py --tree /path/to/llama.cpp [--converter_python PY] [--outtype f16] [--threads N]
"""

import contextlib
import json
import os
import sys
import tempfile

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from sleb import latency  # noqa: E402
from sleb.settings import LatencySettings  # noqa: E402


def demo_sized(folder: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def main(tree: str, converter_python: str = None, outtype: str = "f16", threads: int = None, repeats: int = 10,
         warmup: int = 3, prompt_len: int = 256, generation_prompt_len: int = 32, new_tokens: int = 128):
    report = {"model": "demo-sized Llama (12 blocks, hidden 256, vocabulary 8192), random weights", "outtype": outtype,
              "removed": [1, 2, 3], "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = demo_sized(folder)
        for mode in ("prompt", "generation"):
            settings = LatencySettings(model_name=model_dir, engine="llama.cpp", llama_cpp=tree,
                                       converter_python=converter_python, gguf_outtype=outtype, threads=threads,
                                       generation=mode == "generation", repeats=repeats, warmup=warmup,
                                       prompt_len=generation_prompt_len if mode == "generation" else prompt_len,
                                       new_tokens=new_tokens if mode == "generation" else None,
                                       result_folder=os.path.join(folder, mode), result_file="latency.json")
            with contextlib.redirect_stdout(sys.stderr):  # the command's table; stdout holds the JSON line only
                record = latency.run_latency(settings)
            report["runs"][mode] = {
                "sizes": record["sizes"], "threads": record["engine"]["threads"],
                "dense_tokens_per_s": round(record["dense"]["tokens_per_s"], 1),
                "pruned_tokens_per_s": round(record["pruned"]["tokens_per_s"], 1),
                "speedup": round(record["speedup"], 3), "ideal_speedup": round(record["ideal_speedup"], 3),
                "speedup_over_ideal": round(record["speedup_over_ideal"], 3)}
            report["environment"] = record["environment"]
            report["llama_cpp_python"] = record["engine"]["llama_cpp_python"]
    print(json.dumps(report))


if __name__ == "__main__":
    fire.Fire(main)
