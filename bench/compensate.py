"""Training-free linear compensation (sleb.compensate): seconds and peak memory of the fit, perplexity
before and after, on the demo model and on a random Llama of hidden 1024; prints one JSON line.

    python bench/compensate.py                          # both cases, CPU
    python bench/compensate.py --cases random --hidden 4096 --intermediate 11008 --layers 32 --device cuda \\
        --dtype float16                                  # Llama-2-7B shape
"""

import json
import os
import sys
import time

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sleb  # noqa: E402
from random_model import random_llama  # noqa: E402
from sleb import memory  # noqa: E402
from sleb.results import environment  # noqa: E402


def _case(model, calibration, held_out, removal_list, device) -> dict:
    with sleb.skipping(model, removal_list):
        plain = sleb.perplexity(model, windows=held_out, progress=False)
    memory.reset_peak(device)
    baseline_mb = memory.peak_mb(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = sleb.compensate(model, calibration, removal_list, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = memory.peak_mb(device)
    compensated = sleb.perplexity(model, windows=held_out, progress=False)
    return {"removal_list": removal_list, "calibration_windows": list(calibration.shape),
            "held_out_windows": list(held_out.shape), "fit_seconds": round(seconds, 3),
            "peak_mb": peak, "peak_mb_before_fit": baseline_mb, "ppl_plain_removal": round(plain, 4),
            "ppl_compensated": round(compensated, 4),
            "runs": [{"run": fit.run, "residual": round(fit.residual, 5),
                      "identity_residual": round(fit.identity_residual, 5), "seconds": fit.seconds}
                     for fit in result.runs]}


def main(cases: str = "demo,random", device: str = "cpu", dtype: str = "float32", layers: int = 8,
         hidden: int = 1024, intermediate: int = 2816, heads: int = 16, vocab: int = 8000, windows: int = 8,
         seqlen: int = 512, seed: int = 0) -> None:
    torch_device = torch.device(device)
    report = {"device": device, "dtype": dtype, "environment": environment(torch_device), "cases": {}}
    for case in str(cases).split(","):
        if case == "demo":
            model, tokenizer = sleb.load("demo", dtype=dtype, device=device)
            dense_ppl_windows = sleb.evaluation_windows(tokenizer, "demo", seqlen=512, model=model)
            calibration = sleb.calibration_windows(tokenizer, "demo", nsamples=64, seqlen=512, model=model)
            report["cases"]["demo"] = _case(model, calibration, dense_ppl_windows, [7, 3, 5], torch_device)
        elif case == "random":
            model = random_llama(layers, hidden, intermediate, heads, vocab, getattr(torch, dtype), torch_device, seed)
            generator = torch.Generator().manual_seed(seed)
            tokens = torch.randint(3, vocab, (2 * windows, seqlen), generator=generator)
            removal = [layers // 2 - 1, layers // 2, layers - 3]
            report["cases"][f"random_hidden{hidden}"] = _case(model, tokens[:windows], tokens[windows:], removal,
                                                              torch_device)
        else:
            raise SystemExit(f"error: unknown case {case!r}; use demo and/or random")
        del model
    print(json.dumps(report))


if __name__ == "__main__":
    fire.Fire(main)
