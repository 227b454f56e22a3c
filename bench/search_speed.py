"""Reference vs fast search engine, same model and calibration windows, one process; prints one JSON line.

    python -m bench.search_speed                       # random Llama, 16 blocks, hidden 512, vocab 8000, CPU
    python -m bench.search_speed --model_name demo --dataset demo --windows 8
    python -m bench.search_speed --layers 32 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 \\
        --windows 16 --seqlen 2048 --phases 2 --device cuda --dtype float16   # Llama-2-7B shape
"""

import json
import time

import fire
import torch

from sleb import data, memory, models, search_algorithms
from sleb.engines import ReferenceEngine
from sleb.fast_search import FastEngine
from sleb.results import environment


def _random_llama(layers, hidden, intermediate, heads, vocab, seqlen, dtype, device, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seqlen, 2048))
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _timed(engine, model, calibration, phases, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    job = search_algorithms.SearchJob(model, calibration, phases, 1, 1, build_engine=lambda: engine, log=lambda *_: None)
    state = search_algorithms.sleb_iterative(job, search_algorithms.SearchState(model.config.num_hidden_layers))
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
        # A random model has no checkpoint dtype: "auto" means float16 on a GPU, as for the paper's models.
        torch_dtype = placement.dtype if placement.dtype != "auto" else torch.float16
        model = _random_llama(layers, hidden, intermediate, heads, vocab, seqlen, torch_dtype, placement.device, seed)
        generator = torch.Generator().manual_seed(seed)
        calibration = torch.randint(0, vocab, (windows, seqlen), generator=generator)
        shape = {"model": "random llama", "layers": layers, "hidden": hidden, "intermediate": intermediate,
                 "heads": heads, "vocab": vocab}
    model.config.use_cache = False
    device_ = models.input_device(model)
    memory.reset_peak(device_)

    with torch.inference_mode():  # warm-up, so neither engine pays for first-call allocations
        model(input_ids=calibration[:1].to(device_), use_cache=False)
    memory.reset_peak(device_)
    reference, reference_s = _timed(ReferenceEngine(model, calibration), model, calibration, phases, device_)
    reference_peak = memory.peak_mb(device_)
    memory.reset_peak(device_)
    fast_engine_started = time.perf_counter()
    engine = FastEngine(model, calibration, batch_size)
    setup_s = time.perf_counter() - fast_engine_started
    fast, fast_s = _timed(engine, model, calibration, phases, device_)
    fast_s += setup_s

    mismatch = max((abs(f - r) / abs(r) for fr, rr in zip(fast.scores, reference.scores)
                    for f, r in zip(fr, rr) if f is not None and r is not None), default=0.0)
    print(json.dumps({
        "reference_s": round(reference_s, 2), "fast_s": round(fast_s, 2), "ratio": round(fast_s / reference_s, 3),
        "same_list": fast.removal_list == reference.removal_list, "removal_list": fast.removal_list,
        "reference_s_per_phase": round(reference_s / phases, 2), "fast_s_per_phase": round(fast_s / phases, 2),
        "max_rel_loss_diff": mismatch, "block_forwards_fast": engine.block_forwards,
        "rescored_candidates": fast.rescored, "max_rescore_gap": fast.max_rescore_gap,
        "abandoned_candidates": sum(bound is not None for row in fast.lower_bounds for bound in row),
        "peak_mem_mb_reference": reference_peak, "peak_mem_mb_fast": memory.peak_mb(device_), "phases": phases,
        "windows": len(calibration), "seqlen": calibration.shape[1], "batch_size": engine.batch_size,
        "dtype": str(model.dtype),
        "device": environment(device_)["device"], "versions": environment(device_)["versions"], **shape,
    }))


if __name__ == "__main__":
    fire.Fire(main)
