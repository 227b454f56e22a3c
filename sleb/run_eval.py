"""`python -m eval`: checks -> data -> load -> prune -> evaluate -> record -> write -> table."""

import time

from sleb import api, blocks, data, model_card, results, stages
from sleb.errors import UsageError


def default_result_file(settings) -> str:
    removed = "-".join(map(str, settings.removal_list)) or "dense"
    return f"eval_{results.slug(settings.model_name)}_removed{len(settings.removal_list)}_{removed}.json"


def _pruned_already(settings):
    """(whether --model_name is a model sleb pruned, the dense model it came from or None). A pruned model (a
    checkpoint's card or a GGUF file names the removed blocks) is not the dense model that KL and agreement
    compare with: those asked for are refused, with the command that measures them. Answers kept is measured
    against the dense model --dense_model names or the card records, and left out where none is named."""
    removed, base = model_card.removed_before(settings.model_name)
    if not removed:
        return False, model_card.dense_source(settings.model_name, removed, base, settings.dense_model)
    asked = [flag for flag, value in (("--eval_kl", settings.eval_kl), ("--eval_agreement", settings.eval_agreement))
             if value]
    if asked:
        raise UsageError(f"{asked[0]} compares with the dense model, and {settings.model_name!r} is already pruned; "
                         f"evaluate from the dense one: --model_name {base or 'DENSE_MODEL'} --removal_list "
                         f"'{removed}'")
    return True, model_card.dense_source(settings.model_name, removed, base, settings.dense_model)


def _source_reference(eval_data, settings, dense_model) -> stages.DenseReference:
    """What a model sleb already pruned is compared with: the answers of the dense model it came from, taken
    before the pruned model loads (nothing where none is named or no answers are asked for)."""
    if dense_model is None or not stages.asks_answers(eval_data):
        if stages.asks_answers(eval_data):
            print(f"answers kept: left out; {settings.model_name!r} is pruned and names no dense model (--dense_model)")
        return stages.DenseReference({})
    dense, dense_tokenizer = stages.load_dense_source(dense_model, settings)
    return stages.DenseReference({}, zeroshot=stages.dense_answers(dense, dense_tokenizer, eval_data, settings))


def run(settings) -> dict:
    """`python -m eval` (`sleb eval`)."""
    config, depth = stages.checked_config(settings)
    settings.check_depth(depth, config)
    pruned_already, dense_model = _pruned_already(settings)
    with results.claim(settings.result_folder, settings.result_file or default_result_file(settings),
                       settings.overwrite) as path:
        started = time.perf_counter()
        # data and load
        if settings.compensate:
            data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        # a pruned model is compared with the dense one it came from, which answers first and goes
        dense = _source_reference(eval_data, settings, dense_model) if pruned_already else None
        model, tokenizer = stages.load(settings)
        load_seconds = time.perf_counter() - started
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.seqlen)
        dense = dense or stages.dense_reference(model, tokenizer, eval_windows, eval_data, settings)  # before blocks go
        # remove (or compensate), evaluate, record
        windows = (api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                           settings.seed, model=model) if settings.compensate else None)
        record = stages.record("eval", settings, model, depth, removal_list=settings.removal_list,
                               times={"load_s": round(load_seconds, 3)})
        stages.remove(model, settings.removal_list, settings, record, windows)
        print(f"model {settings.model_name}: {depth} blocks, removed {settings.removal_list or 'none'} -> "
              f"{blocks.num_blocks(model)} blocks" + (f" ({settings.compensate} compensation)" if windows is not None else ""))
        stages.evaluate(model, tokenizer, eval_windows, eval_data, dense, settings, record)
        stages.write_and_save(model, tokenizer, settings, record, path, started)
    if record["ppl"]:
        print(stages.ppl_table({"pruned": record["ppl"]}, kl=record.get("kl_to_dense")))
    print(f"results written to {path}")
    return record
