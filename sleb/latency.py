"""`python -m latency`: prompt and generation latency, dense vs pruned, measured in one process.

checks -> load -> measure dense -> prune -> measure pruned -> record -> write -> table. gpt-fast
style: warm-up runs, CUDA synchronised around `time.perf_counter()`, median and spread over repeats,
tokens/s, and each model's own peak memory (reset in between). Only depth matters for latency, so by
default the removed blocks are simply ceil(0.2 N) blocks starting at block 1.
"""

import os
import statistics
import tempfile
import time

import torch

from sleb import api, gguf_file, llama_cpp, memory, models, results, stages, sublayers
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


def _summary(times: list, tokens: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "times_s": times,
            "tokens_per_s": tokens / median}


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
    out = _summary(times, input_ids.numel() if new_tokens == 0 else input_ids.shape[0] * new_tokens)
    if new_tokens:
        out["new_tokens_generated"] = generated["tokens"]
    out["peak_mem_mb" if device.type == "cuda" else "peak_rss_mb"] = memory.peak_mb(device)
    return out


def default_result_file(settings) -> str:
    mode = "generation" if settings.generation else "prompt"
    return (f"latency_{results.slug(settings.model_name)}_{mode}_b{settings.batch_size}_p{settings.prompt_len}"
            f"_n{settings.new_tokens}_removed{len(settings.removal_list)}"
            f"{'_sublayers' if sublayers.has_sublayers(settings.removal_list) else ''}"
            f"{'_compiled' if settings.compile else ''}.json")


def run(settings) -> dict:
    """Dense vs pruned latency, speedup and ideal speedup."""
    # checks
    settings.check()
    if settings.engine == "llama.cpp":
        return run_llama_cpp_latency(settings)
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
        worth = sublayers.blocks_worth(model, removal_list)  # sub-layers count by their share of a block's weights
        print(f"{mode}: batch {settings.batch_size}, prompt {settings.prompt_len} tokens"
              + (f", {settings.new_tokens} new tokens (greedy)" if settings.new_tokens else "")
              + f"; removing {removal_list} ({worth:g} of {depth} blocks' weights; only how much matters for latency)")
        how = (settings.new_tokens, settings.warmup, settings.repeats, settings.static_cache, settings.compile)
        dense = measure(model, input_ids, *how)
        api.remove_blocks(model, removal_list)
        if compile_forward:
            torch._dynamo.reset()  # the block list changed: compile the pruned graph afresh
        pruned = measure(model, input_ids, *how)

        # record and write
        speedup = dense["median_s"] / pruned["median_s"]
        ideal = depth / (depth - worth)
        record = stages.record("latency", settings, model, depth, mode=mode,
                               sizes={name: getattr(settings, name) for name in ("batch_size", "prompt_len", "new_tokens")},
                               removal_list=removal_list, dense=dense, pruned=pruned, speedup=speedup,
                               ideal_speedup=ideal, speedup_over_ideal=speedup / ideal)
        results.write_json(path, record)
    _print_table(record, [(f"dense ({depth} blocks)", dense), (f"pruned ({depth - worth:g} blocks' weights)", pruned)],
                 f"{record['environment']['device']}, {record['dtype']}", settings, path)
    return record


def _print_table(record: dict, measured: list, where: str, settings, path: str) -> None:
    rows = [[label, f"{m['median_s'] * 1e3:.1f}", f"{m['min_s'] * 1e3:.1f}-{m['max_s'] * 1e3:.1f}",
             f"{m['tokens_per_s']:.1f}"] for label, m in measured]
    print(results.table(["model", "median (ms)", "min-max (ms)", "tokens/s"], rows))
    speedup, ideal = record["speedup"], record["ideal_speedup"]
    print(f"speedup {speedup:.3f}x (ideal {ideal:.3f}x, {100 * speedup / ideal:.1f}% of ideal) on {where}, "
          f"{settings.repeats} repeats after {settings.warmup} warm-up")
    print(f"results written to {path}")


def _gguf_paths(settings) -> tuple:
    """Where --llama_cpp writes the two GGUF files: beside the results, named by model, removal and type."""
    stem = os.path.join(settings.result_folder, results.slug(settings.model_name))
    return (f"{stem}_dense_{settings.gguf_outtype}.gguf",
            f"{stem}_removed{'-'.join(map(str, settings.removal_list))}_{settings.gguf_outtype}.gguf")


def _convert_both(settings, dense_file: str, pruned_file: str) -> None:
    """Save the dense and the pruned checkpoint (each through the reload guard) and convert both with the
    tree's converter; the checkpoints are scratch, the GGUF files stay."""
    model, tokenizer = stages.load(settings)
    written = []
    try:
        with tempfile.TemporaryDirectory(dir=settings.result_folder, prefix=".checkpoints-") as scratch:
            for side, out in (("dense", dense_file), ("pruned", pruned_file)):
                if side == "pruned":
                    api.remove_blocks(model, settings.removal_list)
                folder = os.path.join(scratch, side)
                api.save_pretrained(model, tokenizer, folder)
                written.append(llama_cpp.convert(folder, out, settings.llama_cpp, settings.converter_python,
                                                 settings.gguf_outtype))
                print(f"{side} GGUF written to {out}")
    except BaseException:
        for file in written:  # a dense file without its pruned twin is no result
            os.remove(file)
        raise


def measure_llama_cpp(path: str, settings, threads: int) -> dict:
    """Prompt processing and (with new tokens) generation after the prompt, timed as `measure` times the
    eager model; generation starts from the state the prompt's last timed run left."""
    cpu = torch.device("cpu")
    with llama_cpp.runner(path, settings.prompt_len, settings.new_tokens, threads) as (_, process, generate):
        out = {"prompt": _summary(_timed_runs(process, cpu, settings.warmup, settings.repeats), settings.prompt_len)}
        if generate is not None:
            out["generation"] = _summary(_timed_runs(generate, cpu, settings.warmup, settings.repeats),
                                         settings.new_tokens)
    return out


def _side(measured: dict, mode: str) -> dict:
    """The mode's figures, with the prompt's beside them in generation mode."""
    return {**measured[mode], **({"prompt_processing": measured["prompt"]} if mode == "generation" else {})}


def run_llama_cpp_latency(settings) -> dict:
    """Dense vs pruned in llama.cpp (llama-cpp-python on the CPU): prompt processing, and generation after
    the prompt with --generation; given GGUF files, or both converted from --model_name."""
    mode = "generation" if settings.generation else "prompt"
    from_gguf = gguf_file.is_gguf(settings.model_name)
    if from_gguf:  # the file as given, against its copy with the blocks removed (their bytes unchanged)
        found = gguf_file.reader(settings.model_name)
        settings.check_depth(int(gguf_file.field(found, f"{gguf_file.architecture(found)}.block_count", 0)))
        dense_file = os.path.abspath(os.path.expanduser(settings.model_name))
        pruned_file = os.path.join(settings.result_folder, f"{results.slug(os.path.basename(dense_file))[:-5]}_removed"
                                                           f"{'-'.join(map(str, settings.removal_list))}.gguf")
        if os.path.exists(pruned_file) and not settings.overwrite:
            raise UsageError(f"{pruned_file} exists; pass --overwrite True or another --result_folder")
    elif settings.llama_cpp is not None:
        _, config = models.load_config(settings.model_name, settings.trust_remote_code)
        settings.check_depth(models.config_depth(config))
        dense_file, pruned_file = _gguf_paths(settings)
        for file in (dense_file, pruned_file):
            if os.path.exists(file) and not settings.overwrite:
                raise UsageError(f"{file} exists; pass --overwrite True or another --result_folder")
    else:
        dense_file, pruned_file = settings.gguf_dense, settings.gguf_pruned
    source = settings.model_name if settings.llama_cpp or from_gguf else dense_file
    file_name = settings.result_file or (f"latency_llama_cpp_{results.slug(source)}_{mode}_p{settings.prompt_len}"
                                         f"_n{settings.new_tokens}.json")
    with results.claim(settings.result_folder, file_name, settings.overwrite) as path:
        if from_gguf:
            kept = [i for i in range(int(gguf_file.field(found, f"{gguf_file.architecture(found)}.block_count")))
                    if i not in set(settings.removal_list)]
            gguf_file.write_pruned(dense_file, pruned_file, kept, removal_order=settings.removal_list)
        elif settings.llama_cpp is not None:
            _convert_both(settings, dense_file, pruned_file)
        files = {"dense": llama_cpp.file_facts(dense_file), "pruned": llama_cpp.file_facts(pruned_file)}
        depth, kept = files["dense"]["block_count"], files["pruned"]["block_count"]
        if not 0 < kept < depth:
            raise UsageError(f"{pruned_file} has {kept} blocks and {dense_file} {depth}: the pruned file must have "
                             "fewer blocks than the dense one")
        if settings.removal_list is not None and len(settings.removal_list) != depth - kept:
            raise UsageError(f"--removal_list names {len(settings.removal_list)} blocks but the files differ by "
                             f"{depth - kept}")
        threads = settings.threads or llama_cpp.default_threads()
        print(f"llama.cpp {mode}: prompt {settings.prompt_len} tokens"
              + (f", {settings.new_tokens} new tokens (greedy)" if settings.new_tokens else "") + f", {threads} threads")
        dense = measure_llama_cpp(dense_file, settings, threads)
        pruned = measure_llama_cpp(pruned_file, settings, threads)
        speedup = dense[mode]["median_s"] / pruned[mode]["median_s"]
        ideal = depth / kept
        record = {"command": "latency", "settings": settings, "environment": results.environment(torch.device("cpu")),
                  "engine": {"name": "llama.cpp", "llama_cpp_python": llama_cpp.version(), "threads": threads,
                             "kv_cache": "the engine's default (float16)"},
                  "num_blocks": depth, "mode": mode,
                  "sizes": {name: getattr(settings, name) for name in ("batch_size", "prompt_len", "new_tokens")},
                  "removal_list": settings.removal_list,
                  "gguf": {side: {"path": file, **files[side]}
                           for side, file in (("dense", dense_file), ("pruned", pruned_file))},
                  "dense": _side(dense, mode), "pruned": _side(pruned, mode),
                  "speedup": speedup, "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal}
        results.write_json(path, record)
    _print_table(record, [(f"dense ({depth} blocks)", dense[mode]), (f"pruned ({kept} blocks)", pruned[mode])],
                 f"llama.cpp, {files['dense']['architecture']}, {threads} threads", settings, path)
    return record
