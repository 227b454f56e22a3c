"""The stages every pipeline shares: fetch evaluation data, load, measure perplexity and zero-shot
accuracy, and start a results record (saving a checkpoint is sleb/checkpoint.py).

A pipeline (run_search, run_eval, latency, heal) is a short list of these calls in one order:
checks -> data -> load -> work -> record -> write -> table.
"""

import time
from dataclasses import dataclass

from sleb import accuracy as zeroshot, api, data, models, results


@dataclass
class EvalData:
    """What evaluation needs, fetched before the model loads so a missing data set fails fast."""

    texts: dict  # data set name -> data.EvalText
    tasks: list  # lm-eval task names ([] when zero-shot is off)
    task_manager: object = None


def fetch_eval_data(settings) -> EvalData:
    texts = {name: data.eval_text(name) for name in settings.ppl_dataset_names()}
    tasks = settings.task_names()
    manager = None
    if tasks:
        manager = zeroshot.task_manager(tasks)
        zeroshot.check_tasks(tasks, manager)
    return EvalData(texts, tasks, manager)


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
    """{data set: (windows, seqlen) token ids}, tokenized once per run."""
    seqlen = models.effective_seqlen(model, seqlen)
    return {name: data.token_windows(tokenizer, text.text, seqlen, text.max_windows)
            for name, text in eval_data.texts.items()}


def perplexity(model, eval_windows: dict, batch_size: int) -> dict:
    """{data set: {"ppl": ..., "windows": ..., "seqlen": ..., "seconds": ...}}."""
    from sleb.ppl import perplexity as measure

    out = {}
    for name, windows in eval_windows.items():
        started = time.perf_counter()
        value = measure(model, windows, batch_size, desc=f"ppl {name}")
        out[name] = {"ppl": value, "windows": len(windows), "seqlen": windows.shape[1],
                     "seconds": round(time.perf_counter() - started, 3)}
    return out


def zeroshot_accuracy(model, tokenizer, eval_data: EvalData, settings):
    """lm-eval's accuracy on the settings' tasks (printed as a table), or None when zero-shot is off."""
    if not eval_data.tasks:
        return None
    result = zeroshot.evaluate_zeroshot(model, tokenizer, eval_data.tasks, eval_data.task_manager,
                                        settings.num_fewshot, settings.limit, settings.zeroshot_batch_size,
                                        settings.log_samples)
    print(zeroshot.zeroshot_table(result))
    return result


def record(command: str, settings, model, num_blocks: int, **fields) -> dict:
    """The start of every results JSON: command, settings, environment, dtype and placement, depth."""
    return {"command": command, "settings": settings,
            "environment": results.environment(models.input_device(model)),
            "dtype": str(model.dtype), "placement": models.placement_record(model), "num_blocks": num_blocks,
            **fields}


def ppl_table(ppl: dict, label: str = "pruned") -> str:
    rows = [[name, f"{entry['ppl']:.3f}", entry["windows"], entry["seqlen"]] for name, entry in ppl.items()]
    return results.table(["data set", f"perplexity ({label})", "windows", "seqlen"], rows)
