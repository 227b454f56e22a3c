"""`python -m latency`: prompt and generation latency, dense vs pruned, measured in one process.

checks -> load -> measure dense -> prune -> measure pruned -> record -> write -> table. gpt-fast
style: warm-up runs, CUDA synchronised around `time.perf_counter()`, median and spread over repeats,
tokens/s, and each model's own peak memory (reset in between). Only depth matters for latency, so by
default the removed blocks are simply ceil(0.2 N) blocks starting at block 1.
"""

import statistics
import time

import torch

from sleb import api, memory, models, results, stages
from sleb.errors import UsageError


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


def _generation_kwargs(static_cache: bool, compile: bool) -> dict:
    """transformers 5 compiles decoding by itself whenever the cache is static (on a GPU): say so explicitly."""
    if not static_cache:
        return {}
    from transformers import CompileConfig

    return {"cache_implementation": "static",
            **({"compile_config": CompileConfig()} if compile else {"disable_compile": True})}


def measure(model, input_ids, new_tokens: int, warmup: int, repeats: int, static_cache: bool = False,
            compile: bool = False) -> dict:
    """Seconds per run (median, min, max), tokens/s and peak memory, for a prompt forward or a greedy generation."""
    device = models.input_device(model)
    memory.reset_peak(device)
    generated = {}

    @torch.inference_mode()
    def run():
        if new_tokens == 0:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        else:
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=model.config.get_text_config().eos_token_id or 0,
                                 **_generation_kwargs(static_cache, compile))
            generated["tokens"] = out.shape[1] - input_ids.shape[1]

    times = _timed_runs(run, device, warmup, repeats)
    median = statistics.median(times)
    tokens = input_ids.numel() if new_tokens == 0 else input_ids.shape[0] * new_tokens
    out = {"median_s": median, "min_s": min(times), "max_s": max(times), "times_s": times,
           "tokens_per_s": tokens / median}
    if new_tokens:
        out["new_tokens_generated"] = generated["tokens"]
    out["peak_mem_mb" if device.type == "cuda" else "peak_rss_mb"] = memory.peak_mb(device)
    return out


def default_result_file(settings) -> str:
    mode = "generation" if settings.generation else "prompt"
    return (f"latency_{results.slug(settings.model_name)}_{mode}_b{settings.batch_size}_p{settings.prompt_len}"
            f"_n{settings.new_tokens}_removed{len(settings.removal_list)}{'_compiled' if settings.compile else ''}.json")


def run_latency(settings) -> dict:
    """Dense vs pruned latency, speedup and ideal speedup."""
    # checks
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
    settings.check_depth(depth)
    limit = models.max_positions(config)
    if settings.prompt_len + settings.new_tokens > limit:
        raise UsageError(f"--prompt_len {settings.prompt_len} + --new_tokens {settings.new_tokens} exceeds the "
                         f"model's {limit} positions; use smaller sizes")
    removal_list = settings.removal_list
    mode = "generation" if settings.generation else "prompt"
    with results.claim(settings.result_folder, settings.result_file or default_result_file(settings),
                       settings.overwrite) as path:
        # load
        model, _ = stages.load(settings)
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (settings.batch_size, settings.prompt_len), generator=generator)
        input_ids = input_ids.to(models.input_device(model))
        compile_forward = settings.compile and mode == "prompt"  # generation compiles inside transformers
        if compile_forward:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        # measure dense, prune, measure pruned
        print(f"{mode}: batch {settings.batch_size}, prompt {settings.prompt_len} tokens"
              + (f", {settings.new_tokens} new tokens (greedy)" if settings.new_tokens else "")
              + f"; removing {removal_list} ({len(removal_list)} of {depth} blocks; only the count matters for latency)")
        how = (settings.new_tokens, settings.warmup, settings.repeats, settings.static_cache, settings.compile)
        dense = measure(model, input_ids, *how)
        api.remove_blocks(model, removal_list)
        if compile_forward:
            torch._dynamo.reset()  # the block list changed: compile the pruned graph afresh
        pruned = measure(model, input_ids, *how)

        # record and write
        speedup = dense["median_s"] / pruned["median_s"]
        ideal = depth / (depth - len(removal_list))
        record = stages.record("latency", settings, model, depth, mode=mode,
                               sizes={name: getattr(settings, name) for name in ("batch_size", "prompt_len", "new_tokens")},
                               removal_list=removal_list, dense=dense, pruned=pruned, speedup=speedup,
                               ideal_speedup=ideal, speedup_over_ideal=speedup / ideal)
        results.write_json(path, record)
    rows = [[label, f"{m['median_s'] * 1e3:.1f}", f"{m['min_s'] * 1e3:.1f}-{m['max_s'] * 1e3:.1f}",
             f"{m['tokens_per_s']:.1f}"] for label, m in ((f"dense ({depth} blocks)", dense),
                                                          (f"pruned ({depth - len(removal_list)} blocks)", pruned))]
    print(results.table(["model", "median (ms)", "min-max (ms)", "tokens/s"], rows))
    print(f"speedup {speedup:.3f}x (ideal {ideal:.3f}x, {100 * speedup / ideal:.1f}% of ideal) on "
          f"{record['environment']['device']}, {record['dtype']}, {settings.repeats} repeats after "
          f"{settings.warmup} warm-up")
    print(f"results written to {path}")
    return record
