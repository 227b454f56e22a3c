"""`python -m eval`: checks -> data -> load -> prune -> evaluate -> record -> write -> table."""

import time

from sleb import api, blocks, data, models, results, stages


def default_result_file(settings) -> str:
    removed = "-".join(map(str, settings.removal_list)) or "dense"
    return f"eval_{results.slug(settings.model_name)}_removed{len(settings.removal_list)}_{removed}.json"


def run(settings) -> dict:
    """`python -m eval` (`sleb eval`)."""
    # checks
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
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
        # prune (and compensate) and evaluate
        compensation = None
        if settings.compensate == "linear":
            windows = api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                              settings.seed, model=model)
            compensation = api.compensate(model, windows, settings.removal_list, settings.ridge,
                                          keep_block_kinds=settings.keep_block_kinds).to_dict()
        else:
            api.remove_blocks(model, settings.removal_list, keep_block_kinds=settings.keep_block_kinds)
        print(f"model {settings.model_name}: {depth} blocks, removed {settings.removal_list or 'none'} -> "
              f"{blocks.num_blocks(model)} blocks" + (" (linear compensation folded in)" if compensation else ""))
        record = stages.record("eval", settings, model, depth, removal_list=settings.removal_list,
                               ppl=stages.perplexity(model, eval_windows, settings.batch_size))
        if compensation:
            record["compensation"] = compensation
        if settings.removal_list:
            record["serving_warnings"] = stages.serving_warnings(model)
        record["zeroshot"] = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        stages.compare_with_dense(model, dense, record, settings.batch_size)
        record["times"] = {"load_s": round(load_seconds, 3), "total_s": round(time.perf_counter() - started, 3)}
        if compensation:
            record["times"]["compensate_s"] = compensation["seconds"]
        # write, save and report (the results stand even where the checkpoint cannot be saved)
        results.write_json(path, record)
        stages.save_outputs(model, tokenizer, settings, record, path)
    if record["ppl"]:
        print(stages.ppl_table(record["ppl"], kl=record.get("kl_to_dense")))
    print(f"results written to {path}")
    return record
