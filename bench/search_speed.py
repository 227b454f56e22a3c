"""Reference vs fast search engine, same model and calibration windows, one process; prints one JSON line.

    python bench/search_speed.py                       # random Llama, 16 blocks, hidden 512, vocab 8000, CPU
    python bench/search_speed.py --model_name demo --dataset demo --windows 8
    python bench/search_speed.py --layers 32 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 \\
        --windows 16 --seqlen 2048 --phases 2 --device cuda --dtype float16   # Llama-2-7B shape
"""

import json
import os
import sys
import time

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sleb import data, models, search  # noqa: E402
from sleb.fast_search import FastEngine  # noqa: E402
from sleb.results import environment  # noqa: E402


def _random_llama(layers, hidden, intermediate, heads, vocab, seqlen, dtype, device, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seqlen, 2048))
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _timed(engine, depth, phases, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    state = search.greedy_search(engine, search.SearchState(depth), phases, 1, 1, log=lambda *_: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return state, time.perf_counter() - started


def main(model_name: str = "", dataset: str = "demo", layers: int = 16, hidden: int = 512,
         intermediate: int = 1376, heads: int = 8, vocab: int = 8000, windows: int = 4, seqlen: int = 256,
         phases: int = 3, batch_size: int = 4, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """Time both engines; every argument is a flag."""
    placement = models.resolve_placement(dtype, device)
    if model_name:
        model, tokenizer = models.load_model(model_name, dtype, device)
        tokens = data.load_calibration_windows(dataset, tokenizer, nsamples=100_000, seed=seed, seqlen=seqlen)
        calibration = tokens[:windows]
        shape = {"model": model_name, "dataset": dataset}
    else:
        model = _random_llama(layers, hidden, intermediate, heads, vocab, seqlen, placement.dtype,
                              placement.device, seed)
        generator = torch.Generator().manual_seed(seed)
        calibration = torch.randint(0, vocab, (windows, seqlen), generator=generator)
        shape = {"model": "random llama", "layers": layers, "hidden": hidden, "intermediate": intermediate,
                 "heads": heads, "vocab": vocab}
    model.config.use_cache = False
    depth = model.config.num_hidden_layers
    device_ = models.input_device(model)
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_)

    with torch.inference_mode():  # warm-up, so neither engine pays for first-call allocations
        model(input_ids=calibration[:1].to(device_), use_cache=False)
    reference, reference_s = _timed(search.ReferenceEngine(model, calibration), depth, phases, device_)
    fast_engine_started = time.perf_counter()
    engine = FastEngine(model, calibration, batch_size)
    setup_s = time.perf_counter() - fast_engine_started
    fast, fast_s = _timed(engine, depth, phases, device_)
    fast_s += setup_s

    mismatch = max((abs(f - r) / abs(r) for fr, rr in zip(fast.losses, reference.losses)
                    for f, r in zip(fr, rr) if f is not None and r is not None), default=0.0)
    if device_.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device_) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "reference_s": round(reference_s, 2), "fast_s": round(fast_s, 2), "ratio": round(fast_s / reference_s, 3),
        "same_list": fast.removal_list == reference.removal_list, "removal_list": fast.removal_list,
        "reference_s_per_phase": round(reference_s / phases, 2), "fast_s_per_phase": round(fast_s / phases, 2),
        "max_rel_loss_diff": mismatch, "block_forwards_fast": engine.block_forwards,
        "rescored_candidates": engine.rescored,
        "abandoned_candidates": sum(bound is not None for row in fast.lower_bounds for bound in row),
        "peak_mem_mb": round(peak, 1), "phases": phases,
        "windows": len(calibration), "seqlen": calibration.shape[1], "batch_size": engine.batch_size,
        "dtype": str(placement.dtype if not model_name else next(model.parameters()).dtype),
        "device": environment(device_)["device"], **shape,
    }))


if __name__ == "__main__":
    fire.Fire(main)
