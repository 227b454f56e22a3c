"""The stages every pipeline shares: fetch evaluation data, load, measure perplexity and zero-shot
accuracy, and start a results record (saving a checkpoint is sleb/checkpoint.py).

A pipeline (run_search, run_eval, latency, heal) is a short list of these calls in one order:
checks -> data -> load -> work (search, remove or compensate, heal) -> evaluate -> record -> write -> table.
"""

import time
from dataclasses import dataclass

from sleb import api, data, models, results
from sleb.accuracy import zeroshot_table


def checked_config(settings):
    """The settings' own checks, then the model's config read (no weights): (config, depth)."""
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    return config, models.config_depth(config)


@dataclass
class EvalData:
    """What evaluation needs, fetched before the model loads so a missing data set or task fails fast."""

    datasets: list  # perplexity data set names (their text is in data's cache)
    tasks: object = None  # the zero-shot tasks (api.zeroshot_tasks), None when zero-shot is off


def fetch_eval_data(settings) -> EvalData:
    names = settings.ppl_dataset_names()
    for name in names:
        data.eval_text(name)  # read now so a missing set fails before the load; the windows come from its cache
    tasks = settings.task_names()
    return EvalData(names, api.zeroshot_tasks(tasks) if tasks else None)


def load(settings, quantize_4bit: bool = False):
    """(model, tokenizer) as the settings place them; `quantize_4bit`: NF4 weights through bitsandbytes."""
    quantization = None
    if quantize_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    return api.load(settings.model_name, settings.dtype, settings.device, settings.device_map, settings.max_memory,
                    settings.trust_remote_code, quantization)


def tokenize_eval_texts(model, tokenizer, eval_data: EvalData, seqlen: int) -> dict:
    """{data set: (windows, seqlen) token ids}, tokenized once per run (dense and pruned share them)."""
    return {name: api.evaluation_windows(tokenizer, name, seqlen, model=model) for name in eval_data.datasets}


def perplexity(model, eval_windows: dict, batch_size: int) -> dict:
    """{data set: {"ppl": ..., "windows": ..., "seqlen": ..., "seconds": ...}}."""
    out = {}
    for name, windows in eval_windows.items():
        started = time.perf_counter()
        value = api.perplexity(model, windows=windows, batch_size=batch_size, label=f"ppl {name}")
        out[name] = {"ppl": value, "windows": len(windows), "seqlen": windows.shape[1],
                     "seconds": round(time.perf_counter() - started, 3)}
    return out


def dense_distributions(model, eval_windows: dict, settings) -> dict:
    """{data set: the dense model's next-token distributions on its windows} when --eval_kl, else {}:
    taken before the model is pruned or compensated, for kl_to_dense after."""
    if not settings.eval_kl:
        return {}
    return {name: api.dense_distributions(model, windows, settings.kl_top_k, settings.kl_gb, settings.batch_size)
            for name, windows in eval_windows.items()}


def kl_to_dense(model, dense: dict, batch_size: int) -> dict:
    """{data set: {"kl": mean nats per predicted token, the vocabulary kept, its memory, seconds}}."""
    out = {}
    for name, distributions in dense.items():
        started = time.perf_counter()
        value = api.kl_to_dense(model, distributions, batch_size, label=f"KL to dense {name}")
        kept = distributions.record()
        out[name] = {"kl": value, "unit": "nats per token", "vocabulary": kept["kl_vocabulary"],
                     "memory_mb": kept["kl_memory_mb"], "seconds": round(time.perf_counter() - started, 3)}
    return out


@dataclass
class DenseReference:
    """What the dense model did, taken before any block goes, for comparisons after: its next-token
    distributions (--eval_kl), greedy continuations (--eval_agreement) and right answers (the answers task)."""

    distributions: dict
    continuations: list = None
    prompts: list = None
    zeroshot: dict = None
    ppl: dict = None  # its perplexity, where the pipeline reports dense beside pruned


def dense_reference(model, tokenizer, eval_windows: dict, eval_data: EvalData, settings,
                    with_ppl: bool = False) -> DenseReference:
    from sleb import agreement

    reference = DenseReference(dense_distributions(model, eval_windows, settings))
    if with_ppl:
        reference.ppl = perplexity(model, eval_windows, settings.batch_size)
    if getattr(settings, "eval_agreement", 0):
        reference.prompts = agreement.prompts(tokenizer, settings.eval_agreement)
        reference.continuations = agreement.continuations(model, reference.prompts)
    reference.zeroshot = dense_answers(model, tokenizer, eval_data, settings)
    return reference


def asks_answers(eval_data: EvalData) -> list:
    """The generative tasks asked for (the answers task), whose right answers "answers kept" compares."""
    from sleb.accuracy import GENERATIVE

    return [name for name in (eval_data.tasks.names if eval_data.tasks else ()) if name in GENERATIVE]


def dense_answers(model, tokenizer, eval_data: EvalData, settings):
    """The dense model's replies and right answers on the generative tasks asked for (None when none is)."""
    generative = asks_answers(eval_data)
    if not generative:
        return None
    return api.zeroshot(model, tokenizer, generative, settings.num_fewshot, settings.limit, settings.zeroshot_batch_size)


def load_dense_source(dense_model: str, settings):
    """(model, tokenizer) of the dense model a pruned --model_name came from, placed as the settings place models."""
    print(f"loading the dense model {dense_model}, which the pruned model is compared with")
    return api.load(dense_model, settings.dtype, settings.device, settings.device_map, settings.max_memory,
                    settings.trust_remote_code)


def compare_with_dense(model, reference: DenseReference, record: dict, batch_size: int) -> None:
    """KL to dense, agreement and answers kept into the record, where the dense reference has them."""
    from sleb import agreement
    from sleb.accuracy import answers_kept

    if reference.distributions:
        record["kl_to_dense"] = kl_to_dense(model, reference.distributions, batch_size)
    if reference.continuations is not None:
        found = agreement.agreement(reference.continuations, agreement.continuations(model, reference.prompts))
        record["agreement"] = found
        print(f"agreement with dense: {found['prefix_mean']:.1f} of {found['new_tokens']} greedy tokens before the "
              f"first divergence, {100 * found['overall']:.1f}% overall ({found['prompts']} prompts)")
    if reference.zeroshot is not None and record.get("zeroshot"):
        record["answers_kept"] = answers_kept(reference.zeroshot, record["zeroshot"])
        record["answers_dense"] = {key: reference.zeroshot[key] for key in ("right", "replies", "question_set")}
        for name, kept in record["answers_kept"].items():
            print(f"{name}: {kept['kept']} of the dense model's {kept['dense_right']} right answers kept "
                  f"({100 * (kept['share'] or 0):.1f}%)")


def remove(model, removal_list: list, settings, record: dict, windows=None, fits=None) -> None:
    """Take the blocks out: with the maps a compensated search already folded in (`fits`), with --compensate
    linear fitted on `windows`, or as they are; what was fitted goes into the record as "compensation"."""
    if settings.compensate and not fits:  # compensate removes the blocks itself
        # eval has no --search_batch_size: it fits with compensate's own default
        record["compensation"] = api.compensate(model, windows, removal_list, settings.ridge,
                                                batch_size=getattr(settings, "search_batch_size", 4),
                                                keep_block_kinds=settings.keep_block_kinds, method=settings.compensate,
                                                local_steps=settings.local_steps, local_lr=settings.local_lr,
                                                seed=settings.seed).to_dict()
        return
    if fits:
        runs = [fit.record() for fit in fits]
        record["compensation"] = {"method": "linear, inside the search", "ridge": 0.0, "runs": runs,
                                  "seconds": round(sum(fit["seconds"] for fit in runs), 3)}
    api.remove_blocks(model, removal_list, keep_block_kinds=settings.keep_block_kinds)


def evaluate(model, tokenizer, eval_windows: dict, eval_data: EvalData, reference: DenseReference, settings,
             record: dict, ppl_key: str = "ppl", zeroshot_key: str = "zeroshot") -> None:
    """The model's figures into the record: serving warnings where blocks went, perplexity, zero-shot
    accuracy, and (with a dense `reference`) KL, agreement and answers kept."""
    if record.get("removal_list"):
        record["serving_warnings"] = serving_warnings(model)
    record[ppl_key] = perplexity(model, eval_windows, settings.batch_size)
    zeroshot = zeroshot_accuracy(model, tokenizer, eval_data, settings)
    if zeroshot is not None:
        record[zeroshot_key] = zeroshot
    if reference is not None:
        compare_with_dense(model, reference, record, settings.batch_size)


def zeroshot_accuracy(model, tokenizer, eval_data: EvalData, settings):
    """lm-eval's accuracy on the settings' tasks (printed as a table), or None when zero-shot is off."""
    if eval_data.tasks is None:
        return None
    result = api.zeroshot(model, tokenizer, eval_data.tasks, settings.num_fewshot, settings.limit,
                          settings.zeroshot_batch_size, settings.log_samples)
    print(zeroshot_table(result))
    return result


def record(command: str, settings, model, num_blocks: int, **fields) -> dict:
    """The start of every results JSON: command, settings, environment, dtype and placement, depth."""
    return {"command": command, "settings": settings,
            "environment": results.environment(models.input_device(model)),
            "dtype": str(model.dtype), "placement": models.placement_record(model), "num_blocks": num_blocks,
            **fields}


def save_checkpoint(model, tokenizer, directory: str, record: dict, path: str, make_card) -> None:
    """Save the model after the reload guard; its warning lines (config fields changed since load) go into
    the results file, written again, and into the model card made from the record by `make_card`."""
    def card(warnings: list):
        if warnings:
            record["config_warnings"] = warnings
            results.write_json(path, record)
        return make_card(record)

    api.save_pretrained(model, tokenizer, directory, card)


def save_outputs(model, tokenizer, settings, record: dict, path: str) -> None:
    """--save_model and --save_gguf, after the results are written: what each wrote goes into the record
    (written again); a step that cannot be carried out is one line, the results kept."""
    if settings.save_model:
        from sleb.model_card import pruned_card

        save_checkpoint(model, tokenizer, settings.save_model, record, path, pruned_card)
    if getattr(settings, "save_gguf", None):
        record["gguf"] = api.save_gguf(model, tokenizer, settings.save_gguf, gguf_type=settings.gguf_type,
                                       llama_cpp_tree=settings.llama_cpp, converter_python=settings.converter_python,
                                       removal_list=record.get("removal_list"))
        results.write_json(path, record)


def serving_warnings(model) -> list:
    """Print a warning line for each serving engine that would build another layout; the list goes in
    the results JSON and the model card."""
    import sys

    found = api.serving_problems(model)
    for problem in found:
        print(f"warning: served by {problem}", file=sys.stderr)
    return found


def ppl_table(columns: dict, kl: dict = None) -> str:
    """The one perplexity table every command prints: {column label: {data set: perplexity entry}} side by
    side (dense, pruned, healed), KL to dense where measured, and the windows they were measured on."""
    kl = kl or {}
    last = list(columns.values())[-1]
    rows = [[name] + [f"{column[name]['ppl']:.3f}" if name in column else "-" for column in columns.values()]
            + ([f"{kl[name]['kl']:.4f}" if name in kl else "-"] if kl else []) + [entry["windows"], entry["seqlen"]]
            for name, entry in last.items()]
    return results.table(["data set"] + [f"perplexity ({label})" for label in columns]
                         + (["KL to dense (nats/token)"] if kl else []) + ["windows", "seqlen"], rows)


def write_and_save(model, tokenizer, settings, record: dict, path: str, started: float) -> None:
    """Total time into the record, the results written, then --save_model and --save_gguf (the results stand
    even where a checkpoint cannot be saved)."""
    record.setdefault("times", {})["total_s"] = round(time.perf_counter() - started, 3)
    if record.get("compensation"):
        record["times"]["compensate_s"] = record["compensation"]["seconds"]
    results.write_json(path, record)
    save_outputs(model, tokenizer, settings, record, path)
