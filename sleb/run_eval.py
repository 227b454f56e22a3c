"""`python -m eval`: checks -> data -> load -> prune -> evaluate -> record -> write -> table."""

import time

from sleb import api, blocks, data, results, stages


def default_result_file(settings) -> str:
    removed = "-".join(map(str, settings.removal_list)) or "dense"
    return f"eval_{results.slug(settings.model_name)}_removed{len(settings.removal_list)}_{removed}.json"


def run(settings) -> dict:
    """`python -m eval` (`sleb eval`)."""
    config, depth = stages.checked_config(settings)
    settings.check_depth(depth, config)
    with results.claim(settings.result_folder, settings.result_file or default_result_file(settings),
                       settings.overwrite) as path:
        started = time.perf_counter()
        # data and load
        if settings.compensate:
            data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        model, tokenizer = stages.load(settings)
        load_seconds = time.perf_counter() - started
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.seqlen)
        dense = stages.dense_reference(model, tokenizer, eval_windows, eval_data, settings)  # before any block goes
        # remove (or compensate), evaluate, record
        windows = (api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                           settings.seed, model=model) if settings.compensate else None)
        record = stages.record("eval", settings, model, depth, removal_list=settings.removal_list,
                               times={"load_s": round(load_seconds, 3)})
        stages.remove(model, settings.removal_list, settings, record, windows)
        print(f"model {settings.model_name}: {depth} blocks, removed {settings.removal_list or 'none'} -> "
              f"{blocks.num_blocks(model)} blocks" + (" (linear compensation folded in)" if windows is not None else ""))
        stages.evaluate(model, tokenizer, eval_windows, eval_data, dense, settings, record)
        stages.write_and_save(model, tokenizer, settings, record, path, started)
    if record["ppl"]:
        print(stages.ppl_table({"pruned": record["ppl"]}, kl=record.get("kl_to_dense")))
    print(f"results written to {path}")
    return record
