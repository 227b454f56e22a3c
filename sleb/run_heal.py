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

from sleb import api, blocks, data, guard, models, results, stages
from sleb.errors import UsageError
from sleb.recovery.lora import last_complete_checkpoint
from sleb.settings import HealSettings


def _pruned_card(model_name: str) -> dict:
    """The sleb metadata of a pruned checkpoint's model card ({} for any other model)."""
    from sleb.model_card import read_card

    path = os.path.expanduser(models.resolve_model_name(model_name))
    return read_card(path) if os.path.isdir(path) else {}


def default_result_file(settings) -> str:
    return f"heal_{results.slug(settings.model_name)}_to_{results.slug(settings.output_dir)}.json"


def run(settings: HealSettings) -> dict:
    """`python -m sleb.heal` (`sleb heal`)."""
    # checks
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
    card = _pruned_card(settings.model_name)
    card_removal = card.get("sleb_removal_list")
    removal_list = settings.check_depth(depth, card_removal)
    settings.check_save_gguf_depth(config, depth - len(removal_list), changes_weights=True)
    result_file = settings.result_file or default_result_file(settings)
    work_dir = os.path.join(settings.result_folder, os.path.splitext(result_file)[0] + "_trainer")
    with results.claim(settings.result_folder, result_file, settings.overwrite or settings.resume) as path:
        resume_from = last_complete_checkpoint(work_dir) if settings.resume else None
        if settings.resume and resume_from is None:
            raise UsageError(f"--resume True but {work_dir!r} holds no complete Trainer checkpoint; run without --resume")
        if not settings.resume and os.path.isdir(work_dir):
            shutil.rmtree(work_dir)  # a finished or abandoned earlier run's checkpoints
        started = time.perf_counter()
        # data
        data.calibration_text(settings.dataset, settings.nsamples, settings.seed)  # fails before the load, cached
        eval_data = stages.fetch_eval_data(settings)
        # load and prune (QLoRA: measured first on the full-precision model, as the merged one will be)
        def full_precision_base():  # QLoRA merges into the unquantized weights, pruned the same way
            base, _ = stages.load(settings)
            api.remove_blocks(base, removal_list, keep_block_kinds=settings.keep_block_kinds)
            return base

        measured, tokenizer = stages.load(settings)
        api.remove_blocks(measured, removal_list, keep_block_kinds=settings.keep_block_kinds)
        original_depth = depth if removal_list else depth + len(card_removal)
        removed = removal_list or card_removal
        eval_windows = stages.tokenize_eval_texts(measured, tokenizer, eval_data, settings.eval_seqlen)
        record = stages.record("heal", settings, measured, original_depth, removal_list=removed,
                               source_metric=card.get("sleb_metric", "given"),
                               base_model=card.get("sleb_base_model", settings.model_name),
                               ppl_precision=str(measured.dtype).replace("torch.", "") + (
                                   ", before and after (training ran on a 4-bit NF4 base)" if settings.load_in_4bit
                                   else ", before and after"),
                               ppl_pruned=stages.perplexity(measured, eval_windows, settings.batch_size))
        if eval_data.tasks:
            record["zeroshot_pruned"] = stages.zeroshot_accuracy(measured, tokenizer, eval_data, settings)
        if settings.load_in_4bit:
            del measured  # the 4-bit base is trained; the full-precision one is loaded again to merge into
            model, tokenizer = stages.load(settings, quantize_4bit=True)
            api.remove_blocks(model, removal_list, keep_block_kinds=settings.keep_block_kinds)
        else:
            model = measured
        train_windows = api.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen,
                                                settings.seed, model=model)
        print(f"healing {settings.model_name}: {blocks.num_blocks(model)} of {original_depth} blocks "
              f"(removed {removed}); {len(train_windows)} training windows of {train_windows.shape[1]} tokens from "
              f"{settings.dataset}")

        # train and merge
        healed = api.heal(model, windows=train_windows, recipe=settings.recipe(), work_dir=work_dir,
                          resume_from=resume_from, adapter_dir=settings.save_adapter,
                          full_precision_base=full_precision_base)
        model = healed.model
        guard.check(model)  # before the healed perplexity: a model that cannot be saved stops here
        record.update(train_seconds=healed.train_seconds, train_windows=healed.train_windows,
                      loss_curve=healed.loss_curve, **healed.targets)
        record["ppl_healed"] = stages.perplexity(model, eval_windows, settings.batch_size)
        record["ppl"] = record["ppl_healed"]  # what other tools read as "the model's perplexity"
        if eval_data.tasks:
            record["zeroshot"] = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        # save and write
        from sleb.model_card import healed_card
        from sleb.plots import plot_loss_curve

        record["output_dir"] = os.path.abspath(settings.output_dir)
        record["serving_warnings"] = stages.serving_warnings(model)
        stages.save_checkpoint(model, tokenizer, settings.output_dir, record, path, healed_card)
        record["times"] = {"train_s": healed.train_seconds, "total_s": round(time.perf_counter() - started, 3)}
        curve = healed.loss_curve
        record["loss_plot"] = plot_loss_curve(curve, os.path.splitext(path)[0] + "_loss.png") if curve else None
        results.write_json(path, record)
        shutil.rmtree(work_dir, ignore_errors=True)  # the merged checkpoint is saved; the Trainer's are spent
        if settings.save_gguf:  # LoRA changed every targeted matrix: each is quantized again to its source type
            record["gguf"] = api.save_gguf(model, tokenizer, settings.save_gguf, gguf_type=settings.gguf_type,
                                           llama_cpp_tree=settings.llama_cpp,
                                           converter_python=settings.converter_python, removal_list=removed)
            results.write_json(path, record)
    rows = [[name, f"{record['ppl_pruned'][name]['ppl']:.3f}", f"{record['ppl_healed'][name]['ppl']:.3f}",
             record["ppl_healed"][name]["windows"]] for name in record["ppl_healed"]]
    if rows:
        print(results.table(["data set", "ppl pruned", "ppl healed", "windows"], rows))
    print(f"trained {healed.train_seconds:.1f} s; healed checkpoint in {record['output_dir']}")
    print(f"results written to {path}")
    return record

