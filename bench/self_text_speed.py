"""Self-generated text, batched against one reply at a time: how long `--dataset self` takes to sample.

    python -m bench.self_text_speed --model_name SmolLM2-135M-Instruct.Q4_1.gguf --count 32 --batches 1,16

Each batch size samples `count` texts from nothing (a fresh cache folder), exactly as `--dataset self` does
(sleb.self_text.texts): batch 1 is one `generate` call a text, the loop sleb used before; batch 16 is today's
default. Prints, and writes to --out, a JSON record: per batch size the seconds, texts per minute, tokens
sampled per second, repetitive replies dropped, and whether other processes shared the cores meanwhile
(bench/cores.py), with the model's sha256, torch's and transformers' versions and the thread count.
"""

import json
import os
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import sleb
from bench import command, cores, real_model
from sleb import results, self_text
from sleb.errors import UsageError


def _sample(model, tokenizer, count: int, batch: int) -> dict:
    previous = os.environ.get("SLEB_CACHE")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["SLEB_CACHE"] = folder  # nothing cached: every text is sampled
        try:
            with cores.Watch() as watch:
                made = self_text.texts(model, tokenizer, count, seed=0, log=lambda *a: None, batch=batch)
            _, _, last = self_text._read(self_text.cache_path(model, tokenizer, count, 0, batch))
        finally:
            os.environ.pop("SLEB_CACHE") if previous is None else os.environ.update(SLEB_CACHE=previous)
    tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in made)
    timing = watch.record()
    return {"batch": batch, **timing, "texts": len(made), "texts_per_minute": round(60 * len(made) / timing["seconds"], 2),
            "text_tokens_per_second": round(tokens / timing["seconds"], 1), "dropped": last["dropped"]}


def main(model_name: str, count: int = 32, batches: str = "1,16",
         out: str = os.path.join(ROOT, "docs", "real_model", "self_text_speed.json")):
    sizes = list(batches) if isinstance(batches, (tuple, list)) else str(batches).split(",")  # fire reads 1,16 as a tuple
    if not all(str(size).strip().isdigit() for size in sizes):
        raise UsageError(f"--batches takes batch sizes separated by commas, like 1,16; got {batches!r}")
    sizes = [int(size) for size in sizes]
    if not isinstance(count, int) or count < 1 or any(size < 1 for size in sizes):
        raise UsageError(f"--count and every --batches size must be at least 1; got {count} and {batches}")
    model, tokenizer = sleb.load(model_name, dtype="float32", device="cpu")
    runs = [_sample(model, tokenizer, count, size) for size in sizes]
    for run in runs:
        print(json.dumps(run), flush=True)
    import transformers

    record = {"model": os.path.basename(model_name), "model_sha256": real_model.file_sha256(model_name)
              if os.path.isfile(model_name) else None, "count": count, "new_tokens": self_text.NEW_TOKENS,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
              "device": "cpu", "runs": runs,
              "speedup": round(runs[0]["seconds"] / runs[-1]["seconds"], 2) if len(runs) > 1 else None,
              "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results.write_json(out, record)
    print(json.dumps({key: record[key] for key in ("count", "threads", "speedup")}))


if __name__ == "__main__":
    command(main)
