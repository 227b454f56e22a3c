"""Prompt and generation latency of a model, dense and with blocks removed, measured in one process.

gpt-fast style: warm-up runs, CUDA synchronised around `time.perf_counter()`, median and spread over
repeats, tokens/s and peak memory. Only depth matters for latency, so by default the removed blocks
are simply ceil(0.2 N) blocks starting at block 1.
"""

import statistics
import time

import torch

from sleb import blocks, models, results
from sleb.errors import UsageError, check_at_least

# Paper settings on a GPU, and what finishes in about a minute on a small CPU.
GPU_DEFAULTS = {"prompt": {"batch_size": 1, "prompt_len": 2048, "new_tokens": 0},
                "generation": {"batch_size": 64, "prompt_len": 64, "new_tokens": 128}}
CPU_DEFAULTS = {"prompt": {"batch_size": 1, "prompt_len": 256, "new_tokens": 0},
                "generation": {"batch_size": 4, "prompt_len": 32, "new_tokens": 32}}


def sizes(settings, device: torch.device) -> dict:
    """Batch size, prompt length and new tokens: the flags where given, else the device's defaults."""
    mode = "generation" if settings.generation else "prompt"
    defaults = (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)[mode]
    chosen = {name: getattr(settings, name) if getattr(settings, name) is not None else default
              for name, default in defaults.items()}
    if mode == "prompt":
        chosen["new_tokens"] = 0
    for name, value in chosen.items():
        check_at_least(name, value, 1 if name != "new_tokens" or mode == "generation" else 0)
    return chosen


def default_removal(depth: int) -> list:
    return list(range(1, 1 + blocks.default_remove_count(depth)))


def check_compile(settings) -> None:
    if not settings.compile:
        return
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UsageError("--compile True but torch.compile is not supported on this Python/platform; "
                         "run without --compile")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(run, device, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def measure(model, input_ids, new_tokens: int, warmup: int, repeats: int, static_cache: bool) -> dict:
    """Seconds per run (median, min, max) and tokens/s, for a prompt forward or a greedy generation."""
    device = models.input_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generated = {}

    @torch.inference_mode()
    def run():
        if new_tokens == 0:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        else:
            kwargs = {"cache_implementation": "static"} if static_cache else {}
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=model.config.eos_token_id or 0, **kwargs)
            generated["tokens"] = out.shape[1] - input_ids.shape[1]

    times = _timed_runs(run, device, warmup, repeats)
    median = statistics.median(times)
    tokens = input_ids.numel() if new_tokens == 0 else input_ids.shape[0] * new_tokens
    out = {"median_s": median, "min_s": min(times), "max_s": max(times), "times_s": times,
           "tokens_per_s": tokens / median}
    if new_tokens:
        out["new_tokens_generated"] = generated["tokens"]
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_latency(settings) -> dict:
    """`python -m latency`: dense vs pruned latency, speedup and ideal speedup."""
    if not settings.generation and (settings.new_tokens is not None or settings.static_cache):
        raise UsageError("--new_tokens and --static_cache apply to --generation True only; add it or drop them")
    check_at_least("warmup", settings.warmup, 0)
    check_at_least("repeats", settings.repeats, 1)
    placement = models.resolve_placement(settings.dtype, settings.device, settings.device_map)
    chosen = sizes(settings, placement.device)
    check_compile(settings)
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
    from sleb.evaluation import parse_removal_list

    removal_list = (parse_removal_list(settings.removal_list) if settings.removal_list is not None
                    else default_removal(depth))
    blocks.check_indices(depth, removal_list)
    if not removal_list:
        raise UsageError("--removal_list is empty; name the blocks to remove, e.g. '[1, 2, 3]'")
    mode = "generation" if settings.generation else "prompt"
    result_file = settings.result_file or (
        f"latency_{results.slug(settings.model_name)}_{mode}_b{chosen['batch_size']}_p{chosen['prompt_len']}"
        f"_n{chosen['new_tokens']}_removed{len(removal_list)}{'_compiled' if settings.compile else ''}.json")
    path = results.prepare_result_path(settings.result_folder, result_file, settings.overwrite)

    model, _ = models.load_model(settings.model_name, settings.dtype, settings.device, settings.device_map,
                                 settings.trust_remote_code)
    limit = models.max_positions(model)
    if chosen["prompt_len"] + chosen["new_tokens"] > limit:
        raise UsageError(f"--prompt_len {chosen['prompt_len']} + --new_tokens {chosen['new_tokens']} exceeds the "
                         f"model's {limit} positions; use smaller sizes")
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (chosen["batch_size"], chosen["prompt_len"]), generator=generator)
    input_ids = input_ids.to(models.input_device(model))
    if settings.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    print(f"{mode}: batch {chosen['batch_size']}, prompt {chosen['prompt_len']} tokens"
          + (f", {chosen['new_tokens']} new tokens (greedy)" if chosen["new_tokens"] else "")
          + f"; removing {removal_list} ({len(removal_list)} of {depth} blocks; only the count matters for latency)")
    dense = measure(model, input_ids, chosen["new_tokens"], settings.warmup, settings.repeats, settings.static_cache)
    blocks.remove_blocks(model, removal_list)
    if settings.compile:
        torch._dynamo.reset()  # the block list changed: compile the pruned graph afresh
    pruned = measure(model, input_ids, chosen["new_tokens"], settings.warmup, settings.repeats, settings.static_cache)

    speedup = dense["median_s"] / pruned["median_s"]
    ideal = depth / (depth - len(removal_list))
    environment = results.environment(models.input_device(model))
    record = {"command": "latency", "settings": settings, "environment": environment, "mode": mode,
              "sizes": chosen, "dtype": str(next(model.parameters()).dtype), "num_blocks": depth,
              "removal_list": removal_list, "dense": dense, "pruned": pruned, "speedup": speedup,
              "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal}
    results.write_json(path, record)
    rows = [[label, f"{m['median_s'] * 1e3:.1f}", f"{m['min_s'] * 1e3:.1f}-{m['max_s'] * 1e3:.1f}",
             f"{m['tokens_per_s']:.1f}"] for label, m in ((f"dense ({depth} blocks)", dense),
                                                          (f"pruned ({depth - len(removal_list)} blocks)", pruned))]
    print(results.table(["model", "median (ms)", "min-max (ms)", "tokens/s"], rows))
    print(f"speedup {speedup:.3f}x (ideal {ideal:.3f}x, {100 * speedup / ideal:.1f}% of ideal) on "
          f"{environment['device']}, {record['dtype']}, {settings.repeats} repeats after {settings.warmup} warm-up")
    print(f"results written to {path}")
    return record
