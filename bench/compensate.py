"""Training-free linear compensation: seconds and peak memory of `sleb.compensate` (the fit after a search,
`--compensate linear`) and of the compensated search (`--metric sleb_compensated`), with the plain `sleb`
search beside it for the ratio; on the demo model (the quickstart's calibration) and on random Llamas of
hidden 1024 and 2048; prints one JSON line.

    python -m bench.compensate                                  # demo + hidden 1024 and 2048, CPU
    python -m bench.compensate --cases random --hidden 4096 --intermediate 11008 --layers 32 --heads 32 \\
        --vocab 32000 --device cuda --dtype float16             # Llama-2-7B shape
"""

import json
import time

import fire
import torch

import sleb
from bench.random_model import random_llama
from sleb import memory
from sleb.results import environment


def _measured(device, work):
    """(result, seconds, peak MB above what was held before) of work()."""
    memory.reset_peak(device)
    before = memory.peak_mb(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = memory.peak_mb(device)
    return result, round(seconds, 3), (round(peak - before, 1) if peak is not None and before is not None else None)


def _case(build, calibration, held_out, removal_list, k, device) -> dict:
    model = build()
    with sleb.skipping(model, removal_list):
        plain = sleb.perplexity(model, windows=held_out, progress=False)
    fit, fit_seconds, fit_peak = _measured(device, lambda: sleb.compensate(model, calibration, removal_list,
                                                                           progress=False))
    compensated = sleb.perplexity(model, windows=held_out, progress=False)
    del model
    record = {"removal_list": removal_list, "calibration_windows": list(calibration.shape),
              "held_out_windows": list(held_out.shape), "fit_seconds": fit_seconds, "fit_peak_above_mb": fit_peak,
              "ppl_plain_removal": round(plain, 4), "ppl_compensated": round(compensated, 4),
              "runs": [{"run": run.run, "residual": round(run.residual, 5),
                        "identity_residual": round(run.identity_residual, 5)} for run in fit.runs]}
    for metric in ("sleb", "sleb_compensated"):
        model = build()
        found, seconds, peak = _measured(device, lambda: sleb.search(model, calibration, k, metric, progress=False))
        record[metric] = {"removal_list": found.removal_list, "search_seconds": seconds, "peak_above_mb": peak,
                          **{key: found.stats[key] for key in ("block_forwards", "statistics_passes", "sums_reused",
                                                               "sums_capacity") if key in found.stats}}
        del model
    record["compensated_over_plain_search"] = round(record["sleb_compensated"]["search_seconds"]
                                                    / record["sleb"]["search_seconds"], 3)
    return record


def main(cases: str = "demo,random", device: str = "cpu", dtype: str = "float32", layers: int = 8,
         hidden: str = "1024,2048", intermediate: int = 0, heads: int = 16, vocab: int = 8000, windows: int = 8,
         seqlen: int = 512, k: int = 2, seed: int = 0) -> None:
    """`hidden`: comma-separated widths of the random cases; `intermediate` 0 means 2.75 x hidden."""
    torch_device = torch.device(device)
    report = {"device": device, "dtype": dtype, "environment": environment(torch_device), "cases": {}}
    for case in (cases if isinstance(cases, (tuple, list)) else str(cases).split(",")):  # fire reads "a,b" as a tuple
        if case == "demo":
            _, tokenizer = sleb.load("demo", dtype=dtype, device=device)
            build = lambda: sleb.load("demo", dtype=dtype, device=device)[0]  # noqa: E731
            model = build()
            # The quickstart's calibration (python -m sleb: 128 demo rows, windows capped at 512 tokens).
            calibration = sleb.calibration_windows(tokenizer, "demo", nsamples=128, seqlen=2048, model=model)
            held_out = sleb.evaluation_windows(tokenizer, "demo", seqlen=512, model=model)
            del model
            report["cases"]["demo"] = _case(build, calibration, held_out, [7, 3, 5], 3, torch_device)
            continue
        if case != "random":
            raise SystemExit(f"error: unknown case {case!r}; use demo and/or random")
        widths = hidden if isinstance(hidden, (tuple, list)) else str(hidden).split(",")  # fire reads "a,b" as a tuple
        for width in (int(value) for value in widths):
            def build(width=width):
                return random_llama(layers, width, intermediate or int(2.75 * width), heads, vocab,
                                    getattr(torch, dtype), torch_device, seed)
            generator = torch.Generator().manual_seed(seed)
            tokens = torch.randint(3, vocab, (2 * windows, seqlen), generator=generator)
            removal = [layers // 2 - 1, layers // 2, layers - 3]
            report["cases"][f"random_hidden{width}"] = _case(build, tokens[:windows], tokens[windows:], removal, k,
                                                             torch_device)
    print(json.dumps(report))


if __name__ == "__main__":
    fire.Fire(main)
