"""`python -m sleb`: checks -> data -> load -> search -> prune -> evaluate -> record -> write -> table."""

import dataclasses
import os
import sys
import time

from sleb import api, data, distributed, metrics, results, stages
from sleb.api import SearchResult
from sleb.errors import UsageError
from sleb.metrics import check_resumable

# Settings that define a search's answer: a resumed run must match them.
_RESUME_KEYS = ("model_name", "num_blocks", "num_remove_blocks", "early_barrier", "latter_barrier", "dataset",
                "nsamples", "seed", "seqlen", "metric", "dtype", "keep_block_kinds", "objective", "kl_top_k",
                "evo_generations", "evo_offspring", "evo_survivors", "evo_first_stage_share", "evo_max_mutations",
                "evo_initial", "evo_greedy_start", "unit")  # --compensate runs after the search


def default_result_file(settings) -> str:
    dataset = results.slug(settings.dataset.replace("file:", ""))
    objective = "" if settings.objective == "ce" else f"_{settings.objective}"  # the paper's loss keeps its old names
    unit = "" if settings.unit == "block" else f"_{settings.unit}"
    return (f"sleb_{results.slug(settings.model_name)}_{settings.metric}{objective}{unit}_remove{settings.num_remove_blocks}"
            f"of{settings.num_blocks}_{dataset}_n{settings.nsamples}_seed{settings.seed}.json")


def _resumed(path: str, settings) -> SearchResult:
    """The search saved in `path`: a finished search of any metric, or the finished phases of sleb."""
    saved_settings, search = _saved(path)
    try:
        resumed = SearchResult.from_dict(search)
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path!r} is not a sleb search result; remove it or pass another --result_file") from None
    check_resumable(settings.metric, search.get("status") == "done", repr(path), "rerun with --overwrite True")
    _same_settings(path, saved_settings, settings)
    return resumed


def _saved(path: str) -> tuple:
    """(settings, search record) of the results file `path`, or one line why it is not a search's."""
    if not os.path.exists(path):
        raise UsageError(f"--resume True but {path!r} does not exist; run without --resume to start the search")
    try:
        saved = results.read_json(path)
        return saved["settings"], saved["search"]
    except (ValueError, KeyError, TypeError, OSError):
        raise UsageError(f"{path!r} is not a sleb search result; remove it or pass another --result_file") from None


def _same_settings(path: str, saved_settings: dict, settings) -> None:
    current = dataclasses.asdict(settings)
    for key in _RESUME_KEYS:
        if saved_settings.get(key) != current[key]:
            raise UsageError(f"cannot resume {path!r}: it was run with --{key} {saved_settings.get(key)!r}, "
                             f"not {current[key]!r}; use the same settings or another --result_file")


def _resumed_sublayers(path: str, settings) -> dict:
    """The sub-layer search saved in `path` (its phases so far, or the finished list)."""
    saved_settings, search = _saved(path)
    if search.get("unit") != settings.unit or "removal_list" not in search:
        raise UsageError(f"{path!r} holds no --unit {settings.unit} search; remove it or pass another --result_file")
    _same_settings(path, saved_settings, settings)
    return search


def _search(model, windows, settings, resumed, base: dict, path: str, main_rank: bool, log) -> SearchResult:
    """sleb.search with the settings, its result saved after every phase so an interrupted run can resume."""
    saved = [resumed]

    def save_partial(partial: SearchResult):
        saved[0] = partial
        if main_rank:
            results.write_json(path, {**base, "search": partial.to_dict()})

    try:
        return api.search(model, windows, settings.num_remove_blocks, settings.metric, settings.engine,
                          early_barrier=settings.early_barrier, latter_barrier=settings.latter_barrier,
                          batch_size=settings.search_batch_size, cache_gb=settings.cache_gb, seed=settings.seed,
                          progress=main_rank, resume=resumed, on_phase=save_partial, log=log,
                          keep_block_kinds=settings.keep_block_kinds, compensation_gb=settings.compensation_gb,
                          objective=settings.objective, kl_top_k=settings.kl_top_k, kl_gb=settings.kl_gb,
                          evolution=settings.evolution())
    except KeyboardInterrupt:
        if saved[0] is not None and saved[0].removal_list and main_rank:
            print(f"interrupted after phase {len(saved[0].removal_list)}; partial result in {path}; "
                  "rerun the same command with --resume True to continue", file=sys.stderr)
        raise


def _sublayer_search(model, tokenizer, windows, eval_windows, eval_data, settings, base: dict, path: str, dense,
                     started: float, log, resumed) -> dict:
    """--unit sublayer|attention|mlp: the greedy loop over sub-layers (sleb/sublayers.py), the result so far saved
    after each phase (--resume goes on from it); then the model with them gone is evaluated against the dense
    figures and written."""
    from sleb import sublayers

    def save_partial(partial):
        results.write_json(path, {**base, "search": {"unit": settings.unit, "status": "searching",
                                                     **dataclasses.asdict(partial)}})

    previous = None
    if resumed is not None:
        fields = {f.name for f in dataclasses.fields(sublayers.SublayerSearch)}
        previous = sublayers.SublayerSearch(**{k: v for k, v in resumed.items() if k in fields})
    found = api.search_sublayers(model, windows, settings.num_remove_blocks, settings.unit, metric=settings.metric,
                                 objective=settings.objective, kl_top_k=settings.kl_top_k, kl_gb=settings.kl_gb,
                                 engine=settings.engine, batch_size=settings.search_batch_size, log=log,
                                 on_phase=save_partial, resume=previous)
    print(f"removal list: {found.removal_list} ({found.weights_removed} of a budget of {found.budget} weights; "
          f"search took {found.total_seconds:.1f} s)")
    record = {**base, "search": {"unit": settings.unit, "status": "done", **dataclasses.asdict(found)},
              "ppl_dense": dense.ppl, "removal_list": found.removal_list,
              "times": {"search_s": found.total_seconds}}
    api.remove_blocks(model, found.removal_list)
    stages.evaluate(model, tokenizer, eval_windows, eval_data, dense, settings, record)
    stages.write_and_save(model, tokenizer, settings, record, path, started)
    if record["ppl"]:
        print(stages.ppl_table({"dense": record["ppl_dense"], f"{len(found.removal_list)} sub-layers removed":
                                record["ppl"]}, kl=record.get("kl_to_dense")))
    return record


def run(settings) -> dict:
    """`python -m sleb` (`sleb search`)."""
    main_rank = distributed.join(settings)  # under torchrun each rank scores a slice of the candidates
    log = print if main_rank else (lambda *args, **kwargs: None)
    config, depth = stages.checked_config(settings)
    settings.check_depth(depth, config)
    metric, k = metrics.get(settings.metric), settings.num_remove_blocks
    result_file = settings.result_file or default_result_file(settings)
    with results.claim(settings.result_folder, result_file, settings.overwrite or settings.resume,
                       writer=main_rank) as path:
        saved_search = None  # a sub-layer search's saved record, which --resume goes on from
        if settings.resume and settings.unit != "block":
            saved_search = _resumed_sublayers(path, settings)
        resumed = _resumed(path, settings) if settings.resume and settings.unit == "block" else None
        started = time.perf_counter()
        data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        model, tokenizer = stages.load(settings)
        windows = api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                          settings.seed, model=model)
        log(f"calibration: {settings.dataset}, {settings.nsamples} rows -> {len(windows)} windows of "
            f"{windows.shape[1]} tokens; {settings.metric} removes {k} of {depth} blocks")
        base = stages.record("sleb", settings, model, depth, calibration_windows=len(windows), seqlen=windows.shape[1])
        if settings.compensate == "linear" or metric.compensates:  # refused before any long work
            api.check_compensable(model, windows, settings.early_barrier, settings.latter_barrier)
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.seqlen)

        def dense_figures():
            return stages.dense_reference(model, tokenizer, eval_windows, eval_data, settings, with_ppl=True)

        if settings.unit != "block":
            record = _sublayer_search(model, tokenizer, windows, eval_windows, eval_data, settings, base, path,
                                      dense_figures(), started, log, saved_search)
            print(f"results written to {path}")
            return record
        dense = dense_figures() if main_rank and metric.changes_weights else None  # before it folds maps in
        found = _search(model, windows, settings, resumed, base, path, main_rank, log)
        if not main_rank:
            return None  # rank 0 evaluates and writes
        print(f"removal list: {found.removal_list} (search took {found.total_seconds:.1f} s)")
        dense = dense or dense_figures()
        record = {**base, "search": found.to_dict(), "ppl_dense": dense.ppl, "removal_list": found.removal_list,
                  "times": {"search_s": round(found.total_seconds, 3)}}
        stages.remove(model, found.removal_list, settings, record, windows, found.fits)
        stages.evaluate(model, tokenizer, eval_windows, eval_data, dense, settings, record)
        del dense  # the dense distributions are not needed past here
        stages.write_and_save(model, tokenizer, settings, record, path, started)
    if record["ppl"]:
        print(stages.ppl_table({f"dense, {depth} blocks": record["ppl_dense"], f"pruned, {depth - k} blocks":
                                record["ppl"]}, kl=record.get("kl_to_dense")))
    if settings.plot:
        from sleb.plots import plot_search

        for png in plot_search(results.to_jsonable(record), os.path.splitext(path)[0]):
            print(f"plot written to {png}")
    print(f"results written to {path}")
    return record
