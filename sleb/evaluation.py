"""Evaluate a pruned model (perplexity per data set), save it, and report: the tail of every pipeline."""

import json
import os
import shutil
import tempfile
import time

from sleb import blocks, data, models, results, zeroshot
from sleb.errors import UsageError, check_at_least
from sleb.perplexity import perplexity


def parse_removal_list(value) -> list:
    """fire turns '[5, 4]' into a list; a JSON string or a comma string also work; [] is dense."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            raise UsageError(f"--removal_list must be a list of block indices such as '[5, 4, 9]', got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise UsageError(f"--removal_list must be a list of block indices such as '[5, 4, 9]', got {value!r}")
    return value


def ppl_dataset_names(settings) -> list:
    if not settings.eval_ppl:
        return []
    names = [name.strip() for name in str(settings.ppl_datasets).split(",") if name.strip()]
    if not names:
        raise UsageError("--ppl_datasets is empty; name at least one data set, e.g. wikitext2,c4")
    for name in names:
        data.check_dataset_name(name)
    return names


def check_eval_flags(settings) -> None:
    """Checks that need no model: run them before loading anything."""
    for name, minimum in (("seqlen", 2), ("batch_size", 1), ("num_fewshot", 0), ("zeroshot_batch_size", 1)):
        check_at_least(name, getattr(settings, name), minimum)
    if settings.save_model and os.path.exists(settings.save_model) and os.listdir(settings.save_model):
        raise UsageError(f"--save_model directory {settings.save_model!r} is not empty; choose a new directory")
    ppl_dataset_names(settings)
    models.resolve_placement(settings.dtype, settings.device, settings.device_map)


def effective_seqlen(model, seqlen: int) -> int:
    return min(seqlen, models.max_positions(model))


def prepare_zeroshot(settings):
    """(task names, lm-eval task manager), checked before the model loads; (None, None) when off."""
    if not settings.eval_zeroshot:
        return None, None
    names = zeroshot.task_names(settings.tasks)
    manager = zeroshot.task_manager(names)
    zeroshot.check_tasks(names, settings.limit, manager)
    return names, manager


def evaluate_zeroshot(model, tokenizer, names, manager, settings) -> dict:
    limit = settings.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)
    result = zeroshot.evaluate_zeroshot(model, tokenizer, names, manager, settings.num_fewshot, limit,
                                        settings.zeroshot_batch_size, settings.log_samples)
    print(zeroshot.zeroshot_table(result))
    return result


def fetch_eval_texts(settings) -> dict:
    """{data set: EvalText} for every --ppl_datasets entry; run before loading the model."""
    return {name: data.eval_text(name) for name in ppl_dataset_names(settings)}


def tokenize_eval_texts(model, tokenizer, eval_texts: dict, seqlen: int) -> dict:
    """{data set: (windows, seqlen) token ids}, tokenized once per run."""
    seqlen = effective_seqlen(model, seqlen)
    return {name: data.token_windows(tokenizer, text.text, seqlen, text.max_windows)
            for name, text in eval_texts.items()}


def evaluate_perplexity(model, eval_windows: dict, batch_size: int) -> dict:
    """{data set: {"ppl": ..., "windows": ..., "seqlen": ..., "seconds": ...}}."""
    out = {}
    for name, windows in eval_windows.items():
        started = time.perf_counter()
        value = perplexity(model, windows, batch_size, desc=f"ppl {name}")
        out[name] = {"ppl": value, "windows": len(windows), "seqlen": windows.shape[1],
                     "seconds": round(time.perf_counter() - started, 3)}
    return out


def save_model(model, tokenizer, directory: str) -> None:
    """save_pretrained into a temporary sibling, then rename: a killed save leaves no complete-looking dir."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.partial-")
    try:
        os.chmod(tmp, 0o777 & ~results.umask())  # mkdtemp makes it owner-only; a checkpoint is for sharing
        use_cache = model.config.use_cache
        model.config.use_cache = True
        model.save_pretrained(tmp)
        model.config.use_cache = use_cache
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked before the run)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ppl_table(ppl: dict, label: str = "pruned") -> str:
    rows = [[name, f"{entry['ppl']:.3f}", entry["windows"], entry["seqlen"]] for name, entry in ppl.items()]
    return results.table(["data set", f"perplexity ({label})", "windows", "seqlen"], rows)


def run_eval(settings) -> dict:
    """`python -m eval`: load -> prune -> perplexity -> save -> report."""
    removal_list = parse_removal_list(settings.removal_list)
    check_eval_flags(settings)
    result_file = settings.result_file or (
        f"eval_{results.slug(settings.model_name)}_removed{len(removal_list)}_"
        f"{'-'.join(map(str, removal_list)) or 'dense'}.json"
    )
    path = results.prepare_result_path(settings.result_folder, result_file, settings.overwrite)

    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    blocks.check_indices(models.config_depth(config), removal_list)

    timings = {}
    started = time.perf_counter()
    eval_texts = fetch_eval_texts(settings)
    task_list, manager = prepare_zeroshot(settings)
    model, tokenizer = models.load_model(settings.model_name, settings.dtype, settings.device,
                                         settings.device_map, settings.trust_remote_code)
    timings["load_s"] = round(time.perf_counter() - started, 3)
    depth = blocks.num_blocks(model)
    blocks.remove_blocks(model, removal_list)
    print(f"model {settings.model_name}: {depth} blocks, removed {removal_list or 'none'} -> "
          f"{blocks.num_blocks(model)} blocks")

    ppl = evaluate_perplexity(model, tokenize_eval_texts(model, tokenizer, eval_texts, settings.seqlen),
                              settings.batch_size)
    zeroshot_result = evaluate_zeroshot(model, tokenizer, task_list, manager, settings) if task_list else None
    if settings.save_model:
        save_model(model, tokenizer, settings.save_model)
        print(f"pruned model saved to {settings.save_model}")
    timings["total_s"] = round(time.perf_counter() - started, 3)

    result = {
        "command": "eval", "settings": settings, "environment": results.environment(models.input_device(model)),
        "dtype": str(next(model.parameters()).dtype), "num_blocks": depth,
        "removal_list": removal_list, "ppl": ppl, "zeroshot": zeroshot_result, "times": timings,
    }
    results.write_json(path, result)
    if ppl:
        print(ppl_table(ppl))
    print(f"results written to {path}")
    return result
