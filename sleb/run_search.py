"""`python -m sleb`: load -> calibrate -> search -> prune -> evaluate -> report."""

import dataclasses
import os
import sys
import time

import torch

from sleb import blocks, data, distributed, models, results
from sleb.errors import UsageError, check_at_least
from sleb.evaluation import (check_eval_flags, effective_seqlen, evaluate_perplexity, evaluate_zeroshot,
                             fetch_eval_texts, prepare_zeroshot, save_model, tokenize_eval_texts)
from sleb.search import (ReferenceEngine, SearchState, angular_search, check_search_flags, cosine_search,
                         greedy_search, oneshot_search, random_search)

ENGINES = ("fast", "reference")
# Settings that define a search's answer: a resumed run must match them.
_RESUME_KEYS = ("model_name", "num_blocks", "num_remove_blocks", "early_barrier", "latter_barrier", "dataset",
                "nsamples", "seed", "seqlen", "metric", "dtype")


def default_result_file(settings, depth: int, k: int) -> str:
    dataset = results.slug(settings.dataset.replace("file:", ""))
    return (f"sleb_{results.slug(settings.model_name)}_{settings.metric}_remove{k}of{depth}_{dataset}"
            f"_n{settings.nsamples}_seed{settings.seed}.json")


def _check_flags(settings) -> None:
    if settings.resume and settings.overwrite:
        raise UsageError("--resume True continues the results file and --overwrite True replaces it; pass one")
    check_eval_flags(settings)
    if settings.engine not in ENGINES:
        raise UsageError(f"unknown --engine {settings.engine!r}; use fast or reference")
    for name, minimum in (("nsamples", 1), ("search_batch_size", 1), ("cache_gb", 0)):
        check_at_least(name, getattr(settings, name), minimum)
    data.check_dataset_name(settings.dataset)


def _resume_state(path: str, settings, depth: int) -> SearchState:
    if not os.path.exists(path):
        raise UsageError(f"--resume True but {path!r} does not exist; run without --resume to start the search")
    try:
        saved = results.read_json(path)
        saved_settings = saved["settings"]
        search = saved["search"]
    except (ValueError, KeyError, OSError):
        raise UsageError(f"{path!r} is not a sleb search result; remove it or pass another --result_file") from None
    current = dataclasses.asdict(settings)
    for key in _RESUME_KEYS:
        if saved_settings.get(key) != current[key]:
            raise UsageError(f"cannot resume {path!r}: it was run with --{key} {saved_settings.get(key)!r}, "
                             f"not {current[key]!r}; use the same settings or another --result_file")
    return SearchState(depth, list(search["removal_list"]), list(search["losses"]),
                       list(search.get("lower_bounds", [])), list(search["phase_seconds"]))


def _engine(settings, model, windows, rank=0, world=1):
    engine = _single_engine(settings, model, windows)
    return distributed.CandidateParallel(engine, rank, world) if world > 1 else engine


def _single_engine(settings, model, windows):
    if settings.engine == "reference":
        return ReferenceEngine(model, windows)
    from sleb.fast_search import FastEngine
    from sleb.perplexity import head_matches_forward

    if not head_matches_forward(model):
        print(f"note: {type(model).__name__} post-processes its logits in a way the fast engine cannot follow; "
              "using the reference engine", file=sys.stderr)
        return ReferenceEngine(model, windows)
    return FastEngine(model, windows, settings.search_batch_size, settings.cache_gb)


def _search_record(state: SearchState, engine_name: str, seconds: float, status: str, extra=None) -> dict:
    record = {"status": status, "engine": engine_name, "removal_list": state.removal_list, "losses": state.losses,
              "lower_bounds": state.lower_bounds, "phase_seconds": state.phase_seconds,
              "total_seconds": round(seconds, 3)}
    record.update(extra or {})
    return record


def run_search(settings) -> dict:
    rank, world = 0, 1
    if distributed.launched():  # under torchrun: each rank scores a slice of the candidates
        rank, world, device = distributed.setup()
        settings.device = device
    main_rank = rank == 0
    _check_flags(settings)
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
    if settings.num_blocks is not None and settings.num_blocks != depth:
        raise UsageError(f"--num_blocks {settings.num_blocks} but {settings.model_name} has {depth} blocks; "
                         f"pass --num_blocks {depth} or leave it out")
    settings.num_blocks = depth
    k = settings.num_remove_blocks if settings.num_remove_blocks is not None else blocks.default_remove_count(depth)
    settings.num_remove_blocks = k
    check_search_flags(depth, k, settings.early_barrier, settings.latter_barrier, settings.metric)
    result_file = settings.result_file or default_result_file(settings, depth, k)
    path = os.path.join(settings.result_folder, result_file)
    if settings.resume:
        state = _resume_state(path, settings, depth)
        if main_rank:
            results.prepare_result_path(settings.result_folder, result_file, overwrite=True)
    else:
        if main_rank:
            path = results.prepare_result_path(settings.result_folder, result_file, settings.overwrite)
        state = SearchState(depth)
    log = print if main_rank else (lambda *args, **kwargs: None)

    started = time.perf_counter()
    calibration = data.calibration_text(settings.dataset, settings.nsamples, settings.seed)
    eval_texts = fetch_eval_texts(settings)
    task_list, manager = prepare_zeroshot(settings)
    model, tokenizer = models.load_model(settings.model_name, settings.dtype, settings.device, settings.device_map,
                                         settings.trust_remote_code)
    seqlen = effective_seqlen(model, settings.seqlen)
    windows = data.token_windows(tokenizer, calibration, seqlen)
    log(f"calibration: {settings.dataset}, {settings.nsamples} rows -> {len(windows)} windows of {seqlen} tokens; "
          f"{settings.metric} removes {k} of {depth} blocks")
    environment = results.environment(models.input_device(model))
    base = {"command": "sleb", "settings": settings, "environment": environment,
            "dtype": str(next(model.parameters()).dtype), "num_blocks": depth,
            "calibration_windows": len(windows), "seqlen": seqlen}

    engine_name = settings.engine  # replaced by the engine actually built (a fallback, or the ranks)

    def save_partial(current: SearchState):
        if not main_rank:
            return
        results.write_json(path, {**base, "search": _search_record(
            current, engine_name, time.perf_counter() - started, "searching")})

    use_cache = model.config.use_cache
    model.config.use_cache = False
    search_started = time.perf_counter()
    engine = None  # the metrics without candidate losses use none
    try:
        if settings.metric == "sleb":
            engine = _engine(settings, model, windows, rank, world)
            engine_name = engine.name
            state = greedy_search(engine, state, k, settings.early_barrier, settings.latter_barrier,
                                  on_phase=save_partial, log=log)
        elif settings.metric == "sleb_oneshot":
            engine = _engine(settings, model, windows, rank, world)
            engine_name = engine.name
            state = oneshot_search(engine, state, k, settings.early_barrier, settings.latter_barrier, log=log)
        elif settings.metric == "cosine":
            state = cosine_search(model, windows, state, k, settings.early_barrier, settings.latter_barrier,
                                  settings.search_batch_size)
        elif settings.metric == "angular":
            state = angular_search(model, windows, state, k, settings.early_barrier, settings.latter_barrier,
                                   settings.search_batch_size)
        else:
            state = random_search(state, k, settings.early_barrier, settings.latter_barrier, settings.seed)
    except KeyboardInterrupt:
        if state.removal_list:
            print(f"interrupted after phase {len(state.removal_list)}; partial result in {path}; "
                  "rerun the same command with --resume True to continue", file=sys.stderr)
        raise
    search_seconds = time.perf_counter() - search_started
    model.config.use_cache = use_cache
    if not main_rank:
        return None  # rank 0 evaluates and writes
    print(f"removal list: {state.removal_list} (search took {search_seconds:.1f} s)")

    record = {**base, "search": _search_record(state, engine_name, search_seconds, "done",
                                               _engine_stats(engine))}
    dense = {}
    eval_windows = tokenize_eval_texts(model, tokenizer, eval_texts, settings.seqlen)
    if eval_windows:
        dense = evaluate_perplexity(model, eval_windows, settings.batch_size)
        record["ppl_dense"] = dense
    blocks.remove_blocks(model, state.removal_list)
    record["removal_list"] = state.removal_list
    if eval_windows:
        record["ppl"] = evaluate_perplexity(model, eval_windows, settings.batch_size)
    if task_list:
        record["zeroshot"] = evaluate_zeroshot(model, tokenizer, task_list, manager, settings)
    if settings.save_model:
        save_model(model, tokenizer, settings.save_model)
        print(f"pruned model saved to {settings.save_model}")
    record["times"] = {"search_s": round(search_seconds, 3), "total_s": round(time.perf_counter() - started, 3)}
    results.write_json(path, record)
    if eval_texts:
        rows = [[name, f"{dense[name]['ppl']:.3f}", f"{record['ppl'][name]['ppl']:.3f}", record["ppl"][name]["windows"]]
                for name in eval_texts]
        print(results.table(["data set", f"ppl dense ({depth} blocks)", f"ppl pruned ({depth - k} blocks)",
                             "windows"], rows))
    if settings.plot:
        from sleb.plots import plot_search

        for png in plot_search(results.to_jsonable(record), os.path.splitext(path)[0]):
            print(f"plot written to {png}")
    print(f"results written to {path}")
    return record


def _engine_stats(engine) -> dict:
    if engine is None or not hasattr(engine, "block_forwards"):
        return {}
    return {"block_forwards": engine.block_forwards, "batch_size": engine.batch_size, "cache": engine.storage,
            "peak_mem_mb": _peak_mem_mb(engine.model)}


def _peak_mem_mb(model):
    device = models.input_device(model)
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None
