"""`python -m sleb.heal`: win back what block removal cost, with LoRA (peft) trained by transformers' Trainer.

checks -> data -> load (and prune) -> perplexity before -> train -> merge -> perplexity after -> save
-> record -> write -> table. The input is a pruned checkpoint written by `--save_model` (its model card
names the removed blocks) or `--model_name` plus `--removal_list`. Training is the Trainer's own
(schedule, gradient accumulation, logging, checkpoints, resume, accelerate/torchrun); the LoRA is
merged into the weights and saved, atomically, as a normal checkpoint that stock transformers loads.

Defaults follow Shortened LLaMA's published recipe (nota-netspresso/shortened-llm): LoRA rank 8,
alpha 16, dropout 0.05 on every attention and MLP projection, AdamW, lr 1e-4, 100 warm-up steps,
2 epochs, batch 64 as 4 x 16 accumulation, 256-token windows.
"""

import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from sleb import api, blocks, checkpoint, data, models, results, stages
from sleb.cli import flag, run_cli
from sleb.errors import UsageError, check_at_least, check_finite
from sleb.settings import EvalFlags, ModelFlags, OutputFlags, check_new_directory, follows_model


@dataclass
class HealSettings(OutputFlags, EvalFlags, ModelFlags):
    """`python -m sleb.heal`: LoRA-heal a pruned model and save the merged checkpoint."""

    output_dir: Optional[str] = flag(None, "where the healed (merged) checkpoint is written; must be new or empty")
    removal_list: Optional[list] = flag(None, "blocks to remove first, e.g. '[7, 3, 5]'; leave out for a pruned "
                                              "checkpoint written by --save_model (its model card names them)")
    dataset: Optional[str] = flag(None, "training text: c4, wikitext2, ptb, demo or file:PATH (.txt/.jsonl); "
                                        "default c4 (demo for the demo model)")
    nsamples: int = flag(20000, "training rows taken from the shuffled train split, then cut into --seqlen windows")
    seqlen: int = flag(256, "tokens per training window (Shortened LLaMA: 256)")
    eval_seqlen: int = flag(2048, "tokens per perplexity window (capped at the model's maximum positions)")
    lora_r: int = flag(8, "LoRA rank")
    lora_alpha: int = flag(16, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = flag(0.05, "dropout on the LoRA input")
    lr: float = flag(1e-4, "peak learning rate of AdamW")
    warmup_steps: int = flag(100, "linear warm-up steps, then linear decay")
    epochs: float = flag(2.0, "passes over the training windows (ignored when --max_steps is set)")
    max_steps: int = flag(-1, "optimizer steps in all (-1: --epochs decide)")
    train_batch_size: int = flag(4, "training windows per device per forward")
    grad_accum: int = flag(16, "forwards per optimizer step (effective batch: train_batch_size x grad_accum x devices)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    seed: int = flag(0, "seed of the data shuffle, LoRA initialisation and dropout")
    logging_steps: int = flag(10, "log the training loss every this many steps")
    save_steps: int = flag(100, "write a Trainer checkpoint (for --resume) every this many steps")
    save_adapter: Optional[str] = flag(None, "also write the LoRA adapter alone (peft format) to this directory")
    load_in_4bit: bool = flag(False, "QLoRA: train on a 4-bit (NF4) base through bitsandbytes; CUDA only")
    resume: bool = flag(False, "continue from the last Trainer checkpoint of an interrupted run with these settings")

    def check(self) -> None:
        if self.output_dir is None:
            raise UsageError("--output_dir is required: the directory the healed checkpoint goes to")
        check_new_directory("output_dir", self.output_dir)
        check_new_directory("save_adapter", self.save_adapter)
        if self.resume and self.overwrite:
            raise UsageError("--resume True continues the training and --overwrite True starts it again; pass one")
        self.check_training()
        for name, minimum in (("eval_seqlen", 2), ("save_steps", 1)):
            check_at_least(name, getattr(self, name), minimum)
        if self.removal_list is not None:
            self.removal_list = blocks.check_removal_list(self.removal_list)
        if self.load_in_4bit:
            import importlib.util

            import torch

            if not torch.cuda.is_available():
                raise UsageError("--load_in_4bit True needs a CUDA GPU (bitsandbytes); train in full precision on CPU")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UsageError("--load_in_4bit True needs bitsandbytes: pip install bitsandbytes")
        if self.dataset is None:
            self.dataset = follows_model(self.model_name, "demo", "c4")
        data.check_dataset_name(self.dataset)
        self.check_eval()
        self.check_model()
        self.check_output()

    def check_training(self) -> None:
        """The checks of the training recipe alone (sleb.heal from Python runs these)."""
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr!r}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive (or set --max_steps), got {self.epochs!r}")
        if self.max_steps != -1:
            check_at_least("max_steps", self.max_steps, 1)
        for name, minimum in (("lora_r", 1), ("lora_alpha", 1), ("warmup_steps", 0), ("train_batch_size", 1),
                              ("grad_accum", 1), ("nsamples", 1), ("seqlen", 2), ("logging_steps", 1)):
            check_at_least(name, getattr(self, name), minimum)

    def check_depth(self, depth: int, card_removal: Optional[list]) -> list:
        """The removal list to apply on load: the given one (checked against the depth), or none for a
        checkpoint whose card says it is already pruned."""
        if self.removal_list is None:
            if card_removal is None:
                raise UsageError(f"{self.model_name!r} is not a pruned checkpoint (no sleb model card names its "
                                 "removed blocks); pass --removal_list '[..]' or a directory written by --save_model")
            return []
        if not self.removal_list:
            raise UsageError("--removal_list is empty: there is nothing to heal; name the removed blocks")
        return blocks.check_removal_list(self.removal_list, depth)


def _pruned_card(model_name: str) -> dict:
    """The sleb metadata of a pruned checkpoint's model card ({} for any other model)."""
    from sleb.model_card import read_card

    path = os.path.expanduser(models.resolve_model_name(model_name))
    return read_card(path) if os.path.isdir(path) else {}


@dataclass
class LoraTargets:
    """What LoRA adapts: full names of linear projections, and of fused expert weights (3-D, one slice
    per expert) that peft wraps through `target_parameters`."""

    modules: list
    expert_parameters: list

    def record(self) -> dict:
        """Short names for the results file and model card."""
        return {"lora_targets": sorted({name.rsplit(".", 1)[-1] for name in self.modules}),
                "lora_expert_parameters": sorted({".".join(name.split(".")[-2:]) for name in self.expert_parameters})}


def _routes(name: str, module) -> bool:
    """A router or a gate that weighs experts: training it would change which experts run, not what they do."""
    last = name.rsplit(".", 1)[-1]
    return "Router" in type(module).__name__ or last in ("gate", "router") or last.endswith("_gate")


def _peft_wraps_parameters() -> bool:
    from peft import LoraConfig

    return "target_parameters" in LoraConfig.__dataclass_fields__


def lora_targets(model) -> LoraTargets:
    """Every linear projection inside the decoder blocks (attention, dense MLP, shared experts, Mamba
    and convolution projections), whatever the architecture calls them, and the fused expert weights
    of MoE blocks where peft can wrap parameters; routers, the embeddings, the LM head and a vision
    tower are left alone."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    prefix = blocks.block_path(model)
    modules, experts = [], []
    for index, block in enumerate(blocks.get_blocks(model)):
        for name, module in block.named_modules():
            full = f"{prefix}.{index}.{name}"
            if _routes(name, module):
                continue
            if isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                modules.append(full)
            elif not isinstance(module, nn.Conv1d):
                experts += [f"{full}.{p}" for p, param in module.named_parameters(recurse=False) if param.dim() == 3]
    if not modules:
        raise UsageError(f"no linear projections found in the blocks of {type(model).__name__}; LoRA has nothing "
                         "to adapt in this architecture")
    return LoraTargets(modules, experts if _peft_wraps_parameters() else [])


def training_dataset(windows):
    """Token windows as the Trainer's data set (labels = inputs; the model shifts them)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})


def _training_windows(settings, tokenizer):
    text = data.calibration_text(settings.dataset, settings.nsamples, settings.seed)
    return training_dataset(data.token_windows(tokenizer, text, settings.seqlen))


def _progress_callback():
    from transformers.trainer_callback import ProgressCallback

    class LossInBar(ProgressCallback):
        """Trainer's bar (steps and ETA) with the last loss on it, instead of a printed dict per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    return LossInBar


def _train(model, train_data, settings, work_dir: str, resume_from=None):
    """LoRA on `model` with transformers' Trainer, from the Trainer checkpoint `resume_from` if given; returns (peft model,
    loss curve, seconds, the LoraTargets adapted)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import ProgressCallback

    set_seed(settings.seed)
    targets = lora_targets(model)
    if targets.expert_parameters and settings.lora_dropout > 0:
        print("note: peft wraps fused expert weights only without dropout; the experts stay as they are "
              "(pass --lora_dropout 0 to adapt them too)", flush=True)
        targets.expert_parameters = []
    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(model)
    experts = {"target_parameters": targets.expert_parameters} if targets.expert_parameters else {}
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets.modules, bias="none", task_type="CAUSAL_LM", **experts)
    model.config.get_text_config().use_cache = False  # training; the saved checkpoint gets it back
    peft_model = get_peft_model(model, config)
    cuda = models.input_device(model).type == "cuda"
    arguments = TrainingArguments(
        output_dir=work_dir, per_device_train_batch_size=settings.train_batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps, warmup_steps=settings.warmup_steps,
        lr_scheduler_type="linear", optim="adamw_torch", weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda,
        dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=False)  # else quiet transformers logging swaps the bar for a printed dict per log
    trainer = Trainer(model=peft_model, args=arguments, train_dataset=train_data, data_collator=default_data_collator)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback())
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    curve = [{"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry]
    for point in curve:
        check_finite(point["loss"], f"the training loss at step {point['step']}", model)
    peft_model.eval()
    return peft_model, curve, seconds, targets


def _merge(peft_model, settings, removal_list, tokenizer):
    """The LoRA merged into the weights. A 4-bit base is reloaded unquantized first: the adapter is
    merged into the full-precision weights, as QLoRA recipes do."""
    if not settings.load_in_4bit:
        return peft_model.merge_and_unload()
    import tempfile

    from peft import PeftModel

    adapter = tempfile.mkdtemp(prefix="sleb-adapter-")
    try:
        peft_model.save_pretrained(adapter)
        base, _ = stages.load(settings)
        api.remove_blocks(base, removal_list)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def _plot_curve(curve: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean CE)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_result_file(settings) -> str:
    return f"heal_{results.slug(settings.model_name)}_to_{results.slug(settings.output_dir)}.json"


def run_heal(settings) -> dict:
    # checks
    settings.check()
    _, config = models.load_config(settings.model_name, settings.trust_remote_code)
    depth = models.config_depth(config)
    card = _pruned_card(settings.model_name)
    card_removal = card.get("sleb_removal_list")
    removal_list = settings.check_depth(depth, card_removal)
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
        eval_data = stages.fetch_eval_data(settings)
        # load and prune
        model, tokenizer = stages.load(settings, quantize_4bit=settings.load_in_4bit)
        train_data = _training_windows(settings, tokenizer)
        api.remove_blocks(model, removal_list)
        original_depth = depth if removal_list else depth + len(card_removal)
        removed = removal_list or card_removal
        print(f"healing {settings.model_name}: {blocks.num_blocks(model)} of {original_depth} blocks "
              f"(removed {removed}); {len(train_data)} training windows of {settings.seqlen} tokens from "
              f"{settings.dataset}")
        eval_windows = stages.tokenize_eval_texts(model, tokenizer, eval_data, settings.eval_seqlen)
        record = stages.record("heal", settings, model, original_depth, removal_list=removed,
                               source_metric=card.get("sleb_metric", "given"),
                               base_model=card.get("sleb_base_model", settings.model_name),
                               ppl_pruned=stages.perplexity(model, eval_windows, settings.batch_size))
        if eval_data.tasks:
            record["zeroshot_pruned"] = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        # train and merge
        peft_model, curve, train_seconds, targets = _train(model, train_data, settings, work_dir, resume_from)
        if settings.save_adapter:
            peft_model.save_pretrained(settings.save_adapter)
        model = _merge(peft_model, settings, removal_list, tokenizer)
        checkpoint.check_reloads(model)  # before the healed perplexity: a model that cannot be saved stops here
        record.update(train_seconds=round(train_seconds, 3), train_windows=len(train_data), loss_curve=curve,
                      **targets.record())
        record["ppl_healed"] = stages.perplexity(model, eval_windows, settings.batch_size)
        record["ppl"] = record["ppl_healed"]  # what other tools read as "the model's perplexity"
        if eval_data.tasks:
            record["zeroshot"] = stages.zeroshot_accuracy(model, tokenizer, eval_data, settings)
        # save and write
        from sleb.model_card import healed_card

        record["output_dir"] = os.path.abspath(settings.output_dir)
        api.save_pretrained(model, tokenizer, settings.output_dir, healed_card(record))
        record["times"] = {"train_s": round(train_seconds, 3), "total_s": round(time.perf_counter() - started, 3)}
        record["loss_plot"] = _plot_curve(curve, os.path.splitext(path)[0] + "_loss.png") if curve else None
        results.write_json(path, record)
        shutil.rmtree(work_dir, ignore_errors=True)  # the merged checkpoint is saved; the Trainer's are spent
    rows = [[name, f"{record['ppl_pruned'][name]['ppl']:.3f}", f"{record['ppl_healed'][name]['ppl']:.3f}",
             record["ppl_healed"][name]["windows"]] for name in record["ppl_healed"]]
    if rows:
        print(results.table(["data set", "ppl pruned", "ppl healed", "windows"], rows))
    print(f"trained {train_seconds:.1f} s; healed checkpoint in {record['output_dir']}")
    print(f"results written to {path}")
    return record


def last_complete_checkpoint(work_dir: str):
    """The newest Trainer checkpoint that was written to the end, or None.

    The Trainer writes a checkpoint's files in place, trainer_state.json last; a run killed while
    writing leaves a newest checkpoint without it, which resuming must step over."""
    import json

    if not os.path.isdir(work_dir):
        return None
    steps = sorted((int(name.split("-")[1]) for name in os.listdir(work_dir)
                    if name.startswith("checkpoint-") and name.split("-")[1].isdigit()), reverse=True)
    for step in steps:
        state = os.path.join(work_dir, f"checkpoint-{step}", "trainer_state.json")
        try:
            with open(state) as handle:
                json.load(handle)
            return os.path.dirname(state)
        except (OSError, ValueError):
            continue
    return None


def cli() -> None:
    run_cli(run_heal, HealSettings, "python -m sleb.heal",
            "LoRA-heal a pruned model with transformers' Trainer; save the merged checkpoint and a results JSON.")


if __name__ == "__main__":
    cli()
