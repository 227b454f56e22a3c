"""`python -m sleb.heal`: win back what block removal cost, with LoRA (sleb.heal: peft trained by
transformers' Trainer, merged into the weights).

checks -> data -> load (and prune) -> perplexity before -> train and merge -> perplexity after -> save
-> record -> write -> table. The input is a pruned checkpoint written by `--save_model` (its model card
names the removed blocks) or `--model_name` plus `--removal_list`. The merged model is saved,
atomically, as a normal checkpoint that stock transformers loads. The recipe's defaults are
Shortened LLaMA's (sleb/recovery/lora.py).
"""

import os
import shutil
import time
from dataclasses import dataclass

from sleb import api, blocks, data, distributed, guard, model_card, results, stages
from sleb.accuracy import answers_kept
from sleb.errors import UsageError
from sleb.recovery.lora import last_complete_checkpoint
from sleb.settings import HealSettings


def default_result_file(settings) -> str:
    return f"heal_{results.slug(settings.model_name)}_to_{results.slug(settings.output_dir)}.json"


def _resume_point(settings: HealSettings, work_dir: str, main_rank: bool = True):
    """The Trainer checkpoint --resume continues from (None: a fresh run, whose old checkpoints go)."""
    if not settings.resume:
        if main_rank:
            shutil.rmtree(work_dir, ignore_errors=True)  # a finished or abandoned earlier run's checkpoints
        return None
    resume_from = last_complete_checkpoint(work_dir)
    if resume_from is None:
        raise UsageError(f"--resume True but {work_dir!r} holds no complete Trainer checkpoint; run without --resume")
    return resume_from


def _pruned(settings: HealSettings, removal_list: list, quantize_4bit: bool = False):
    model, tokenizer = stages.load(settings, quantize_4bit=quantize_4bit)
    api.remove_blocks(model, removal_list, keep_block_kinds=settings.keep_block_kinds)
    return model, tokenizer


def _save(model, tokenizer, settings: HealSettings, record: dict, path: str, healed, removed: list) -> None:
    """The merged checkpoint (atomically, with its card), the loss plot, the results, then --save_gguf."""
    from sleb.model_card import healed_card
    from sleb.plots import plot_loss_curve

    record["output_dir"] = os.path.abspath(settings.output_dir)
    stages.save_checkpoint(model, tokenizer, settings.output_dir, record, path, healed_card)
    curve = healed.loss_curve
    record["loss_plot"] = plot_loss_curve(curve, os.path.splitext(path)[0] + "_loss.png") if curve else None
    results.write_json(path, record)
    if settings.save_gguf:  # LoRA changed every targeted matrix: each is quantized again to its source type
        record["gguf"] = api.save_gguf(model, tokenizer, settings.save_gguf, gguf_type=settings.gguf_type,
                                       llama_cpp_tree=settings.llama_cpp,
                                       converter_python=settings.converter_python, removal_list=removed)
        results.write_json(path, record)


def _check_dense(model_name: str, removed_before: list, base, depth: int, removal_list: list) -> None:
    """Distillation takes the loaded model's distributions for the dense model's: refuse a model sleb already
    pruned, naming the command that starts from the dense one (its removal list in the dense numbering)."""
    if removed_before:
        in_dense = blocks.in_dense_numbering(removed_before, removal_list, depth)
        raise UsageError(f"--objective kl distils from the dense model, and {model_name!r} is already pruned; heal "
                         f"from the dense one: --model_name {base or 'DENSE_MODEL'} --removal_list '{in_dense}'")


@dataclass
class Source:
    """What heal takes from the dense model before training: the training windows (--dataset self samples the
    dense model's own text) and its answers to the questions (for answers kept), each None where not taken."""

    windows: object = None
    answers: dict = None


def _from_dense_source(settings: HealSettings, dense_model, eval_data) -> Source:
    """For a model sleb already pruned: the dense model it came from loads, gives what heal needs of it, and
    goes, before the pruned model loads."""
    wants_text, wants_answers = settings.dataset == "self", bool(stages.asks_answers(eval_data))
    if dense_model is None or not (wants_text or wants_answers):
        if wants_answers:
            print(f"answers kept: left out; {settings.model_name!r} is pruned and names no dense model (--dense_model)")
        return Source()
    model, tokenizer = stages.load_dense_source(dense_model, settings)
    windows = (api.calibration_windows(tokenizer, "self", settings.nsamples, settings.seqlen, settings.seed, model=model)
               if wants_text else None)
    return Source(windows, stages.dense_answers(model, tokenizer, eval_data, settings))


def _check_source(settings: HealSettings, removed_before: list, base) -> object:
    """The dense model a pruned input came from (None for a dense input, or where none is named). --dataset self
    samples the dense model's text: refused in one line where a pruned input names no dense model."""
    dense_model = model_card.dense_source(settings.model_name, removed_before, base, settings.dense_model)
    if removed_before and dense_model is None and settings.dataset == "self":
        raise UsageError(f"--dataset self samples the dense model's own text, and {settings.model_name!r} is already "
                         "pruned and names no dense model; pass --dense_model DENSE_MODEL")
    return dense_model


def _train_windows(settings: HealSettings, model, tokenizer, source: Source):
    # from the model before its blocks go (--dataset self samples the dense model), or from the dense source
    if source.windows is not None:
        return source.windows
    return api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen, settings.seed,
                                   model=model)


def run(settings: HealSettings) -> dict:
    """`python -m sleb.heal` (`sleb heal`). Under torchrun every rank loads, prunes and trains (the Trainer
    runs them as one data-parallel job); rank 0 alone claims the results file, evaluates and saves."""
    main_rank = distributed.join(settings)
    config, depth = stages.checked_config(settings)
    card = model_card.checkpoint_card(settings.model_name)
    # what sleb removed before: a pruned checkpoint's card or a pruned GGUF's sleb.removal_list names it
    removed_before, base = model_card.removed_before(settings.model_name, card)
    removal_list = settings.check_depth(depth, removed_before or None)
    if settings.objective == "kl":
        _check_dense(settings.model_name, removed_before, base, depth, removal_list)
    dense_model = _check_source(settings, removed_before, base)
    settings.check_save_gguf_depth(config, depth - len(removal_list), changes_weights=True)
    result_file = settings.result_file or default_result_file(settings)
    work_dir = os.path.join(settings.result_folder, os.path.splitext(result_file)[0] + "_trainer")
    with results.claim(settings.result_folder, result_file, settings.overwrite or settings.resume,
                       writer=main_rank) as path:
        resume_from = _resume_point(settings, work_dir, main_rank)
        started = time.perf_counter()
        data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        source = _from_dense_source(settings, dense_model, eval_data) if removed_before else Source()
        # load and prune; measured on the full-precision model, as the merged one will be (QLoRA too)
        model, tokenizer = stages.load(settings)
        train_windows = _train_windows(settings, model, tokenizer, source)
        dense = (api.dense_distributions(model, train_windows, settings.kl_top_k, settings.kl_gb, settings.batch_size)
                 if settings.objective == "kl" else None)  # what distillation learns: taken before the blocks go
        answers = source.answers if removed_before else stages.dense_answers(model, tokenizer, eval_data, settings)
        trained = _remove(settings, model, removal_list, train_windows)
        original_depth, removed = ((depth, removal_list) if removal_list
                                   else (depth + len(removed_before), removed_before))
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.eval_seqlen)
        # the dense model it all came from: the input itself, or the one a pruned input names (None: not known)
        origin = settings.model_name if not removed_before else dense_model
        record = _start_record(settings, model, tokenizer, eval_windows, eval_data, original_depth, removed, card,
                               origin, dense, answers, trained)
        if settings.load_in_4bit:  # QLoRA trains a 4-bit base, then merges into the full-precision one loaded again
            del model
            model, tokenizer = _pruned(settings, removal_list, quantize_4bit=True)
        if main_rank:
            print(f"healing {settings.model_name}: {blocks.num_blocks(model)} of {original_depth} blocks (removed "
                  f"{removed}); {len(train_windows)} training windows of {train_windows.shape[1]} tokens from "
                  f"{settings.dataset}, loss: " + ("KL to the dense model" if dense is not None else "cross-entropy"))
        healed = api.heal(model, windows=train_windows, recipe=settings.recipe(), work_dir=work_dir, dense=dense,
                          resume_from=resume_from, adapter_dir=settings.save_adapter,
                          full_precision_base=lambda: _pruned(settings, removal_list)[0])
        if not main_rank:
            return None  # rank 0 evaluates and saves the merged model
        _finish(healed, tokenizer, eval_windows, eval_data, settings, record, answers, path, removed, started)
        shutil.rmtree(work_dir, ignore_errors=True)  # the merged checkpoint is saved; the Trainer's are spent
    if record["ppl_healed"]:
        print(stages.ppl_table({"pruned": record["ppl_pruned"], "healed": record["ppl_healed"]}))
    print(f"trained {healed.train_seconds:.1f} s; healed checkpoint in {record['output_dir']}")
    print(f"results written to {path}")
    return record


def _remove(settings: HealSettings, model, removal_list: list, train_windows):
    """The blocks out; with --local_steps, the block before each run trained on the training windows first
    (what it did, for the record; None without)."""
    if not settings.local_steps:
        api.remove_blocks(model, removal_list, keep_block_kinds=settings.keep_block_kinds)
        return None
    return api.compensate(model, train_windows, removal_list, method="local", local_steps=settings.local_steps,
                          local_lr=settings.local_lr, seed=settings.seed, batch_size=settings.batch_size,
                          keep_block_kinds=settings.keep_block_kinds).to_dict()


def _start_record(settings, model, tokenizer, eval_windows, eval_data, original_depth, removed, card, origin, dense,
                  answers, trained=None) -> dict:
    """The record of the pruned model before training (after local reconstruction, where asked): perplexity, and
    the questions' answers kept."""
    record = stages.record("heal", settings, model, original_depth, removal_list=removed,
                           source_metric=card.get("sleb_metric", "given"), base_model=origin,
                           ppl_precision=str(model.dtype).replace("torch.", "") + (
                               ", before and after (training ran on a 4-bit NF4 base)" if settings.load_in_4bit
                               else ", before and after"),
                           ppl_pruned=stages.perplexity(model, eval_windows, settings.batch_size))
    if dense is not None:
        record["distilled_from"] = dense.record()
    if trained is not None:
        record["compensation"] = trained
    if eval_data.tasks:
        record["zeroshot_pruned"] = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        if answers is not None:
            record["answers_kept_pruned"] = answers_kept(answers, record["zeroshot_pruned"])
    return record


def _finish(healed, tokenizer, eval_windows, eval_data, settings, record, answers, path, removed, started) -> None:
    """The healed model checked, evaluated (answers kept against the dense model's) and saved."""
    model = healed.model
    guard.check(model)  # before the healed perplexity: a model that cannot be saved stops here
    record.update(train_seconds=healed.train_seconds, train_windows=healed.train_windows,
                  loss_curve=healed.loss_curve, times={"train_s": healed.train_seconds}, **healed.targets)
    reference = stages.DenseReference({}, zeroshot=answers) if answers is not None else None
    stages.evaluate(model, tokenizer, eval_windows, eval_data, reference, settings, record, ppl_key="ppl_healed")
    record["ppl"] = record["ppl_healed"]  # what other tools read as "the model's perplexity"
    record["times"]["total_s"] = round(time.perf_counter() - started, 3)
    _save(model, tokenizer, settings, record, path, healed, removed)
