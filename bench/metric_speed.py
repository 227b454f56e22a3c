"""Every search metric, and both objectives where a metric scores by loss, on one model and one set of
calibration windows, one process; prints one JSON line: per run its seconds, block forwards, the list
and its calibration loss on the run's own objective.

    python -m bench.metric_speed                                 # the demo model, demo data, 3 of 12 removed
    python -m bench.metric_speed --metrics sleb,evopress --objectives kl
    python -m bench.metric_speed --model_name DIR --dataset wikitext2 --nsamples 128 --device cuda
    python -m bench.metric_speed --model_name random --layers 32 --hidden 4096 --intermediate 14336 --heads 32 \
        --kv_heads 8 --vocab 128256 --windows 16 --seqlen 2048 --device cuda --dtype bfloat16 \
        --metrics sleb,evopress --objectives kl --kl_gb 1 --evo_generations 3   # a Llama-3-8B shape

Block forwards are counted by a hook on every block (one per window a block runs on), so every metric,
the cosine and angular passes, the KL objective's dense pass and compensation's statistics passes are
counted the same way, with the short probes (16 tokens) each search runs first to check that its engine
can follow the model; `engine_block_forwards` is the fast engine's own count, without them.
"""

import contextlib
import json
import sys
import time

import fire
import torch

import sleb
from sleb import blocks, memory, models
from sleb.results import environment
from sleb.evopress import Evolution
from sleb.metrics import METRICS
from bench.random_model import random_llama

DEFAULT_METRICS = "sleb,sleb_oneshot,sleb_compensated,evopress,cosine,angular,random"


class _BlockForwards:
    """Counts window x block forwards through a forward hook on each block."""

    def __init__(self, model):
        self.count = 0
        self.handles = [block.register_forward_hook(self._seen) for block in blocks.get_blocks(model)]

    def _seen(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.count += hidden.shape[0] if hidden.dim() == 3 else 1

    def close(self):
        for handle in self.handles:
            handle.remove()


def _names(value) -> list:
    """A comma-separated flag as fire hands it over: a string, or a tuple where it saw commas."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(part).strip() for part in parts if str(part).strip()]


def _model_and_windows(model_name, dataset, nsamples, seqlen, dtype, device, seed, shape):
    if model_name != "random":
        with contextlib.redirect_stdout(sys.stderr):  # the loader's line; stdout is the one JSON line
            model, tokenizer = sleb.load(model_name, dtype, device)
        return model, sleb.calibration_windows(tokenizer, dataset, nsamples, seqlen, seed, model=model)
    placement = models.resolve_placement(dtype, device)
    torch_dtype = placement.dtype if placement.dtype != "auto" else torch.float16  # a random model has no own dtype
    model = random_llama(shape["layers"], shape["hidden"], shape["intermediate"], shape["heads"], shape["vocab"],
                         torch_dtype, placement.device, seed, num_key_value_heads=shape["kv_heads"] or shape["heads"])
    generator = torch.Generator().manual_seed(seed)
    return model, torch.randint(0, shape["vocab"], (shape["windows"], seqlen), generator=generator)


def main(model_name: str = "demo", dataset: str = "demo", nsamples: int = 64, seqlen: int = 2048,
         num_remove_blocks: int = 3, metrics: str = DEFAULT_METRICS, objectives: str = "ce,kl",
         kl_top_k: int = 512, kl_gb: float = 0.0, evo_generations: int = None, device: str = "auto",
         dtype: str = "auto", seed: int = 0, layers: int = 16, hidden: int = 512, intermediate: int = 1376,
         heads: int = 8, kv_heads: int = 0, vocab: int = 8000, windows: int = 4):
    """Run each metric (x each objective where it applies) and time it; every argument is a flag (the shape
    flags and --windows apply to --model_name random: a random Llama on random token ids)."""
    shape = dict(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                 vocab=vocab, windows=windows)
    model, windows = _model_and_windows(model_name, dataset, nsamples, seqlen, dtype, device, seed, shape)
    device_ = models.input_device(model)
    names, goals = _names(metrics), _names(objectives)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise SystemExit(f"error: unknown metrics {unknown}; known: {', '.join(METRICS)}")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # sleb_compensated folds maps in
    runs = []
    for metric in names:
        for objective in [goal for goal in goals if goal in METRICS[metric].objectives]:
            model.load_state_dict(state)
            counter = _BlockForwards(model)
            memory.reset_peak(device_)
            if device_.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            found = sleb.search(model, windows, num_remove_blocks, metric, objective=objective, seed=seed,
                                progress=False, kl_top_k=kl_top_k, kl_gb=kl_gb,
                                evolution=Evolution(generations=evo_generations))
            if device_.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            counter.close()
            run = {"metric": metric, "objective": objective if len(METRICS[metric].objectives) > 1 else None,
                   "seconds": round(seconds, 2), "block_forwards": counter.count,
                   "removal_list": found.removal_list, "peak_mem_mb": memory.peak_mb(device_)}
            if "block_forwards" in found.stats:
                run["engine_block_forwards"] = found.stats["block_forwards"]  # the fast engine's own count
                run["rescored"] = found.rescored  # near ties settled the reference way (not in the engine's count)
            if found.generations:
                run["generations"] = len(found.generations) - 1
                run["s_per_generation"] = round(
                    sum(g["seconds"] for g in found.generations[1:]) / max(1, len(found.generations) - 1), 2)
                run["greedy_list"] = found.generations[0]["greedy"]
                run["loss"] = found.generations[-1]["value"]
                run["greedy_loss"] = found.generations[0]["greedy_value"]
            if found.objective.get("kl_memory_mb") is not None:
                run["kl_vocabulary"] = found.objective["kl_vocabulary"]
                run["kl_memory_mb"] = found.objective["kl_memory_mb"]
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)  # as each run ends; the summary is the one stdout line
    env = environment(device_)
    described = {"model": model_name, "dataset": dataset} if model_name != "random" else {"model": "random llama", **shape}
    print(json.dumps({**described, "calibration_windows": len(windows), "seqlen": windows.shape[1],
                      "num_blocks": blocks.num_blocks(model), "num_remove_blocks": num_remove_blocks,
                      "dtype": str(model.dtype), "device": env["device"], "versions": env["versions"],
                      "runs": runs}))


if __name__ == "__main__":
    fire.Fire(main)
