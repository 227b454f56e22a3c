"""The reload guard's cost (sleb/guard.py: two meta rebuilds holding the model's tensors, two probe forwards,
a short generation): seconds and peak memory above the loaded model, on the demo model and on a random
Llama of hidden 1024; prints one JSON line.

    python -m bench.guard                                     # both cases, CPU
    python -m bench.guard --cases random --hidden 4096 --intermediate 11008 --layers 32 --heads 32 \\
        --vocab 32000 --device cuda --dtype float16            # Llama-2-7B shape
"""

import json
import time

import fire
import torch

import sleb
from bench.random_model import random_llama
from sleb import guard, memory, serving
from sleb.results import environment


def _case(model, removal_list, device, repeats: int) -> dict:
    sleb.remove_blocks(model, removal_list)
    serving.align(model.config)
    guard.check(model)  # warm-up: first calls allocate and import
    memory.reset_peak(device)
    before = memory.peak_mb(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        verdict = guard.check(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = memory.peak_mb(device)
    return {"removal_list": removal_list, "blocks_left": len(model.model.layers), "probe_tokens": verdict.probe_tokens,
            "logit_gap": verdict.logit_gap, "seconds_median": round(sorted(seconds)[len(seconds) // 2], 3),
            "seconds_min": round(min(seconds), 3), "seconds_max": round(max(seconds), 3), "repeats": repeats,
            "peak_mb": peak, "peak_mb_with_model_loaded": before,
            "peak_above_model_mb": round(peak - before, 1) if peak is not None and before is not None else None}


def main(cases: str = "demo,random", device: str = "cpu", dtype: str = "float32", layers: int = 8,
         hidden: int = 1024, intermediate: int = 2816, heads: int = 16, vocab: int = 8000, repeats: int = 3,
         seed: int = 0) -> None:
    torch_device = torch.device(device)
    report = {"device": device, "dtype": dtype, "environment": environment(torch_device), "cases": {}}
    for case in (cases if isinstance(cases, (tuple, list)) else str(cases).split(",")):  # fire reads "a,b" as a tuple
        if case == "demo":
            model, _ = sleb.load("demo", dtype=dtype, device=device)
            report["cases"]["demo"] = _case(model, [7, 3, 5], torch_device, repeats)
        elif case == "random":
            model = random_llama(layers, hidden, intermediate, heads, vocab, getattr(torch, dtype), torch_device, seed)
            removal = [layers // 2 - 1, layers // 2, layers - 3]
            report["cases"][f"random_hidden{hidden}_{layers}blocks"] = _case(model, removal, torch_device, repeats)
        else:
            raise SystemExit(f"error: unknown case {case!r}; use demo and/or random")
        del model
    print(json.dumps(report))


if __name__ == "__main__":
    fire.Fire(main)
