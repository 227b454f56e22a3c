"""LoRA healing: adapt every projection of the (pruned) blocks with peft, train with transformers'
Trainer, merge the adapter into the weights.

The loss is the next-token cross-entropy on the training text (`objective="ce"`), or, for distillation
(`objective="kl"`), the mean KL(p_dense || p_model) per predicted token, the dense model's distributions
of the same windows taken before its blocks went (sleb/objectives.py, as the KL search objective keeps
them): the pruned model is taught to say what the dense one said, not what the text says next.

Training is the Trainer's own (schedule, gradient accumulation, logging, checkpoints, resume,
accelerate/torchrun). The defaults of `LoraRecipe` follow Shortened LLaMA's published recipe
(nota-netspresso/shortened-llm): rank 8, alpha 16, dropout 0.05 on every attention and MLP
projection, AdamW, lr 1e-4, 100 warm-up steps, 2 epochs, batch 64 as 4 x 16 accumulation.
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from sleb import blocks, models, objectives
from sleb.errors import UsageError, check_at_least, check_finite


@dataclass
class LoraRecipe:
    """How LoRA is trained; every field is also a flag of `python -m sleb.heal`."""

    lora_r: int = 8  # rank
    lora_alpha: int = 16  # scale alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lr: float = 1e-4  # peak learning rate of AdamW
    warmup_steps: int = 100  # linear warm-up, then linear decay
    epochs: float = 2.0  # passes over the windows (ignored when max_steps is set)
    max_steps: int = -1  # optimizer steps in all (-1: epochs decide)
    train_batch_size: int = 4  # windows per device per forward
    grad_accum: int = 16  # forwards per optimizer step
    weight_decay: float = 0.0
    seed: int = 0  # LoRA initialisation, dropout and data order
    logging_steps: int = 10
    save_steps: int = 100  # a Trainer checkpoint (to resume from) every this many steps
    objective: str = "ce"  # ce: cross-entropy on the text; kl: KL to the dense model's distributions (distillation)
    # instead of LoRA: every parameter of these blocks trained, the rest frozen; original block numbers, or
    # "before": the kept block in front of each removed run (the one local reconstruction trains)
    train_blocks: Optional[object] = None

    def check(self) -> None:
        if self.train_blocks is not None and self.train_blocks != "before" and not (
                isinstance(self.train_blocks, (list, tuple)) and self.train_blocks and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.train_blocks)):
            raise UsageError("--train_blocks must be a list of block numbers, e.g. '[4, 15]', or before (the block in "
                             f"front of each removed run), got {self.train_blocks!r}")
        if self.objective not in objectives.OBJECTIVES:
            raise UsageError(f"--objective must be ce (cross-entropy on the text) or kl (distillation to the dense "
                             f"model), got {self.objective!r}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr!r}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive (or set --max_steps), got {self.epochs!r}")
        if self.max_steps != -1:
            check_at_least("max_steps", self.max_steps, 1)
        for name, minimum in (("lora_r", 1), ("lora_alpha", 1), ("warmup_steps", 0), ("train_batch_size", 1),
                              ("grad_accum", 1), ("logging_steps", 1), ("save_steps", 1)):
            check_at_least(name, getattr(self, name), minimum)


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


@dataclass
class Trained:
    """What training left: the peft-wrapped model and how it got there."""

    peft_model: object
    loss_curve: list  # [{"step", "loss"}] as the Trainer logged it
    seconds: float
    targets: LoraTargets


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


def training_dataset(windows, numbered: bool = False):
    """Token windows as the Trainer's data set (labels = inputs; the model shifts them); `numbered` adds
    each window's row, which finds its dense distributions when distilling."""
    from datasets import Dataset

    columns = {"input_ids": windows.tolist(), "labels": windows.tolist()}
    if numbered:
        columns["row"] = list(range(len(windows)))
    return Dataset.from_dict(columns)


def _distilling_trainer():
    """transformers' Trainer whose loss is the mean KL to the dense model's distributions (`dense`, a
    sleb.objectives.KLToDense of the training windows). The loss goes through the Trainer's own
    `compute_loss_func` hook, so gradient accumulation and multi-device scaling stay the Trainer's."""
    from transformers import Trainer

    class Distilling(Trainer):
        def __init__(self, *args, dense, **kwargs):
            super().__init__(*args, compute_loss_func=self._kl_loss, **kwargs)
            self.dense, self._rows = dense, None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._rows = inputs.pop("row").tolist()  # which windows: the model takes no such input
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _kl_loss(self, outputs, labels, num_items_in_batch=None):
            logits = outputs.logits[:, :-1].float()
            total = self.dense.chunk_sums(logits, self._rows, 0, logits.shape[1]).sum()
            # the Trainer counts the predicted positions of all the step's micro-batches (labels[..., 1:])
            # and does not divide a compute_loss_func's loss again
            count = num_items_in_batch if num_items_in_batch is not None else (
                logits.shape[0] * logits.shape[1] * self.current_gradient_accumulation_steps)
            return total / count

    return Distilling


def _progress_callback():
    from transformers.trainer_callback import ProgressCallback

    class LossInBar(ProgressCallback):
        """Trainer's bar (steps and ETA) with the last loss on it, instead of a printed dict per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    return LossInBar


def full_blocks(model, train_blocks) -> list:
    """Positions in `model` of the blocks `train_blocks` names (original numbers, or "before"), or one line
    saying why they cannot be trained."""
    found = blocks.origin(model)
    if train_blocks == "before":
        from sleb.recovery.linear import runs_of

        if not found.removed:
            raise UsageError("--train_blocks before trains the block in front of each removed run, and this model "
                             "shows no removed blocks (a checkpoint loaded pruned): name the blocks, e.g. '[4, 15]'")
        runs = runs_of(found.removed)
        if runs[0][0] == 0:
            raise UsageError("--train_blocks before: block 0 is removed and has no block in front; name the blocks")
        train_blocks = [run[0] - 1 for run in runs]
    missing = [i for i in train_blocks if i not in found.kept]
    if missing:
        raise UsageError(f"--train_blocks names block {missing[0]}, which this model does not hold (it holds "
                         f"{found.kept}, in the original numbering)")
    return sorted({found.kept.index(i) for i in train_blocks})


def _freeze_all_but(model, positions: list) -> LoraTargets:
    """Full-parameter training of the blocks at `positions`: every other parameter frozen. What is trained, as
    the record names it."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    stack = blocks.get_blocks(model)
    for position in positions:
        for parameter in stack[position].parameters():
            parameter.requires_grad_(True)
    kept = blocks.origin(model).kept
    return FullTargets([kept[p] for p in positions])


@dataclass
class FullTargets:
    """The blocks trained in full (original numbers), in place of LoRA's targets."""

    blocks: list

    def record(self) -> dict:
        return {"trained_blocks": self.blocks}


def quantized(model) -> bool:
    """Weights held in 4 or 8 bits (bitsandbytes): trained as QLoRA, merged into a full-precision base."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def train(model, windows, recipe: LoraRecipe, work_dir: str, resume_from: Optional[str] = None,
          dense=None) -> Trained:
    """LoRA on `model` over the token `windows` with transformers' Trainer, from the Trainer checkpoint
    `resume_from` if given; the Trainer's checkpoints go to `work_dir`. `dense`: the dense model's
    distributions of the windows (sleb.objectives.KLToDense), which `recipe.objective` "kl" distils from."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import ProgressCallback

    set_seed(recipe.seed)
    model.config.get_text_config().use_cache = False  # training; the caller puts it back on the merged model
    if recipe.train_blocks is not None:
        if quantized(model):
            raise UsageError("--train_blocks trains full-precision weights; a 4-bit model trains only by LoRA")
        targets, peft_model = _freeze_all_but(model, full_blocks(model, recipe.train_blocks)), model
    else:
        targets = lora_targets(model)
        if targets.expert_parameters and recipe.lora_dropout > 0:
            print("note: peft wraps fused expert weights only without dropout; the experts stay as they are "
                  "(pass --lora_dropout 0 to adapt them too)", flush=True)
            targets.expert_parameters = []
        if quantized(model):
            model = prepare_model_for_kbit_training(model)
        experts = {"target_parameters": targets.expert_parameters} if targets.expert_parameters else {}
        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=targets.modules, bias="none", task_type="CAUSAL_LM", **experts)
        peft_model = get_peft_model(model, config)
    cuda = models.input_device(model).type == "cuda"
    arguments = TrainingArguments(
        output_dir=work_dir, per_device_train_batch_size=recipe.train_batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.lr,
        num_train_epochs=recipe.epochs, max_steps=recipe.max_steps, warmup_steps=recipe.warmup_steps,
        lr_scheduler_type="linear", optim="adamw_torch", weight_decay=recipe.weight_decay,
        logging_steps=recipe.logging_steps, save_steps=recipe.save_steps, save_total_limit=2,
        seed=recipe.seed, data_seed=recipe.seed, report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda,
        dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=False)  # else quiet transformers logging swaps the bar for a printed dict per log
    distilling = recipe.objective == "kl"
    trainer = (_distilling_trainer() if distilling else Trainer)(
        model=peft_model, args=arguments, train_dataset=training_dataset(windows, numbered=distilling),
        data_collator=default_data_collator, **({"dense": dense} if distilling else {}))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback())
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    curve = [{"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry]
    for point in curve:
        check_finite(point["loss"], f"the training loss at step {point['step']}", model)
    peft_model.eval()
    return Trained(peft_model, curve, seconds, targets)


def merge(peft_model, full_precision_base: Optional[Callable] = None):
    """The LoRA merged into the weights. A quantized base is merged into full-precision weights, as
    QLoRA recipes do: `full_precision_base()` returns the same (pruned) model unquantized. A model trained in
    full (--train_blocks) has nothing to merge: its parameters are trainable again, as a loaded model's are."""
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        for parameter in peft_model.parameters():
            parameter.requires_grad_(True)
        return peft_model
    if not quantized(peft_model.get_base_model()):
        return peft_model.merge_and_unload()
    if full_precision_base is None:
        raise UsageError("the model was trained in 4 bits: merging needs the full-precision model "
                         "(pass full_precision_base, a function returning it pruned the same way)")
    import shutil
    import tempfile

    adapter = tempfile.mkdtemp(prefix="sleb-adapter-")
    try:
        peft_model.save_pretrained(adapter)
        return PeftModel.from_pretrained(full_precision_base(), adapter).merge_and_unload()
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def last_complete_checkpoint(work_dir: str) -> Optional[str]:
    """The newest Trainer checkpoint in `work_dir` that was written to the end, or None.

    The Trainer writes a checkpoint's files in place, trainer_state.json last; a run killed while
    writing leaves a newest checkpoint without it, which resuming must step over."""
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
