"""`python -m sleb`: checks -> data -> load -> search -> prune -> evaluate -> record -> write -> table."""

import contextlib
import dataclasses
import os
import sys
import time

from sleb import api, data, distributed, models, results, stages
from sleb.api import SearchResult
from sleb.errors import UsageError
from sleb.search_algorithms import CHANGES_WEIGHTS, check_resumable

# Settings that define a search's answer: a resumed run must match them.
_RESUME_KEYS = ("model_name", "num_blocks", "num_remove_blocks", "early_barrier", "latter_barrier", "dataset",
                "nsamples", "seed", "seqlen", "metric", "dtype", "keep_block_kinds", "objective", "kl_top_k",
                "evo_generations", "evo_offspring", "evo_survivors", "evo_first_stage_share", "evo_max_mutations",
                "evo_initial", "evo_greedy_start")  # --compensate runs after the search


def default_result_file(settings) -> str:
    dataset = results.slug(settings.dataset.replace("file:", ""))
    objective = "" if settings.objective == "ce" else f"_{settings.objective}"  # the paper's loss keeps its old names
    return (f"sleb_{results.slug(settings.model_name)}_{settings.metric}{objective}_remove{settings.num_remove_blocks}"
            f"of{settings.num_blocks}_{dataset}_n{settings.nsamples}_seed{settings.seed}.json")


def _resumed(path: str, settings) -> SearchResult:
    """The search saved in `path`: a finished search of any metric, or the finished phases of sleb."""
    if not os.path.exists(path):
        raise UsageError(f"--resume True but {path!r} does not exist; run without --resume to start the search")
    try:
        saved = results.read_json(path)
        saved_settings, search = saved["settings"], saved["search"]
        resumed = SearchResult.from_dict(search)
    except (ValueError, KeyError, TypeError, OSError):
        raise UsageError(f"{path!r} is not a sleb search result; remove it or pass another --result_file") from None
    check_resumable(settings.metric, search.get("status") == "done", repr(path), "rerun with --overwrite True")
    current = dataclasses.asdict(settings)
    for key in _RESUME_KEYS:
        if saved_settings.get(key) != current[key]:
            raise UsageError(f"cannot resume {path!r}: it was run with --{key} {saved_settings.get(key)!r}, "
                             f"not {current[key]!r}; use the same settings or another --result_file")
    return resumed


def run(settings) -> dict:
    """`python -m sleb` (`sleb search`)."""
    rank = 0
    if distributed.launched():  # under torchrun: each rank scores a slice of the candidates (sleb.search sees the group)
        rank, _, settings.device = distributed.setup()
    main_rank = rank == 0
    log = print if main_rank else (lambda *args, **kwargs: None)

    # checks
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    settings.check_depth(models.config_depth(config), config)
    result_file = settings.result_file or default_result_file(settings)
    claim = (results.claim(settings.result_folder, result_file, settings.overwrite or settings.resume)
             if main_rank else contextlib.nullcontext(os.path.join(settings.result_folder, result_file)))
    with claim as path:
        resumed = _resumed(path, settings) if settings.resume else None
        started = time.perf_counter()
        # data
        data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        # load
        model, tokenizer = stages.load(settings)
        windows = api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                          settings.seed, model=model)
        seqlen = windows.shape[1]
        depth, k = settings.num_blocks, settings.num_remove_blocks
        log(f"calibration: {settings.dataset}, {settings.nsamples} rows -> {len(windows)} windows of {seqlen} "
            f"tokens; {settings.metric} removes {k} of {depth} blocks")
        base = stages.record("sleb", settings, model, depth, calibration_windows=len(windows), seqlen=seqlen)

        if settings.compensate == "linear" or settings.metric == "sleb_compensated":  # refused before any long work
            api.check_compensable(model, windows, settings.early_barrier, settings.latter_barrier)
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.seqlen)
        changes_weights = settings.metric in CHANGES_WEIGHTS  # its dense perplexity must come first
        dense, reference = {}, None
        if main_rank and changes_weights:
            dense = stages.perplexity(model, eval_windows, settings.batch_size)
            reference = stages.dense_reference(model, tokenizer, eval_windows, eval_data, settings)

        # search (saved after every phase, so an interrupted run can resume)
        saved = [resumed]

        def save_partial(partial: SearchResult):
            saved[0] = partial
            if main_rank:
                results.write_json(path, {**base, "search": partial.to_dict()})

        try:
            found = api.search(model, windows, k, settings.metric, settings.engine,
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
        search_seconds = found.total_seconds
        if not main_rank:
            return None  # rank 0 evaluates and writes
        print(f"removal list: {found.removal_list} (search took {search_seconds:.1f} s)")

        # prune and evaluate
        record = {**base, "search": found.to_dict()}
        if not changes_weights:
            dense = stages.perplexity(model, eval_windows, settings.batch_size)
            reference = stages.dense_reference(model, tokenizer, eval_windows, eval_data, settings)
        if dense:
            record["ppl_dense"] = dense
        if found.fits:  # sleb_compensated left each chosen block's map folded in
            runs = [fit.record() for fit in found.fits]
            record["compensation"] = {"method": "linear, inside the search", "ridge": 0.0, "runs": runs,
                                      "seconds": round(sum(fit["seconds"] for fit in runs), 3)}
            api.remove_blocks(model, found.removal_list, keep_block_kinds=settings.keep_block_kinds)
        elif settings.compensate == "linear":
            record["compensation"] = api.compensate(model, windows, found.removal_list, settings.ridge,
                                                    batch_size=settings.search_batch_size,
                                                    keep_block_kinds=settings.keep_block_kinds).to_dict()
        else:
            # the search honoured --keep_block_kinds; the list it found is removed as found
            api.remove_blocks(model, found.removal_list, keep_block_kinds=settings.keep_block_kinds)
        record["removal_list"] = found.removal_list
        record["serving_warnings"] = stages.serving_warnings(model)
        if eval_windows:
            record["ppl"] = stages.perplexity(model, eval_windows, settings.batch_size)
        zeroshot = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        if zeroshot is not None:
            record["zeroshot"] = zeroshot
        stages.compare_with_dense(model, reference, record, settings.batch_size)
        del reference  # the dense distributions are not needed past here
        record["times"] = {"search_s": round(search_seconds, 3), "total_s": round(time.perf_counter() - started, 3)}
        if "compensation" in record:
            record["times"]["compensate_s"] = record["compensation"]["seconds"]

        # write, save and report (the results stand even where the checkpoint cannot be saved)
        results.write_json(path, record)
        stages.save_outputs(model, tokenizer, settings, record, path)
    if dense:
        kl = record.get("kl_to_dense", {})
        rows = [[name, f"{dense[name]['ppl']:.3f}", f"{record['ppl'][name]['ppl']:.3f}"]
                + ([f"{kl[name]['kl']:.4f}"] if kl else []) + [record["ppl"][name]["windows"]] for name in dense]
        print(results.table(["data set", f"ppl dense ({depth} blocks)", f"ppl pruned ({depth - k} blocks)"]
                            + (["KL to dense (nats/token)"] if kl else []) + ["windows"], rows))
    if settings.plot:
        from sleb.plots import plot_search

        for png in plot_search(results.to_jsonable(record), os.path.splitext(path)[0]):
            print(f"plot written to {png}")
    print(f"results written to {path}")
    return record
