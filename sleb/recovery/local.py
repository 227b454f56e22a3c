"""Local reconstruction: for each run of removed blocks, train the kept block in front of it, all of its
parameters, so that its output matches what the run would have made of it (LLM-Streamline, arXiv
2403.19135, trains a light replacement against the dense hidden states the same way). `--compensate
linear` is the closed-form case: a linear map on the block's last sub-layer only.

For a maximal run `a..b` (original indices) with kept block `l = a - 1` before it, on the model as it
stands (earlier runs already trained and skipped, which is the same model as deleted):
    X = what enters block l, H = block b's output when l, a..b run on X (the residual stream after the run),
and block l is trained (AdamW, `steps` steps over the calibration batches in a seeded order) to minimise
    mean ||l(X) - H||^2 / mean ||H||^2
over every token. Inputs and targets are computed once and kept (tokens x hidden each per run, in the
model's dtype); the block trains in float32, one block at a time. The model then goes on from the trained
block's output, so the next run sees what the pruned model computes.
"""

import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from sleb import blocks, forward
from sleb.errors import UsageError
from sleb.recovery.linear import runs_of


@dataclass
class RunTraining:
    """One removed run's trained block: how far its output was from the run's, before and after."""

    run: list  # original indices a..b of the removed blocks
    before: int  # original index l of the block trained
    tokens: int  # calibration tokens the training saw
    steps: int
    error_removed: float  # mean ||l(X) - H||^2 / mean ||H||^2 untrained: plain removal
    error_trained: float  # the same after training
    seconds: float

    def record(self) -> dict:
        return asdict(self)


def check(removal_list: list, steps: int, lr: float) -> list:
    """The runs to train for, refused in one line where a run starts at block 0 (no block before it)."""
    runs = runs_of(removal_list)
    if runs and runs[0][0] == 0:
        raise UsageError("--compensate local trains the block before each removed run; block 0 has none: "
                         "keep block 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--local_steps must be an integer >= 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise UsageError(f"--local_lr must be a number > 0, got {lr!r}")
    return runs


def _relative_error(block, inputs: list, states: list, index: int, targets: list) -> float:
    with torch.no_grad():
        error = power = 0.0
        for hidden, state, target in zip(inputs, states, targets):
            out = forward.output_of(block(hidden, *state.args[index], **state.kwargs[index])).float()
            error += (out - target.float()).pow(2).sum().item()
            power += target.float().pow(2).sum().item()
    return error / power


def _train(block, inputs: list, states: list, index: int, targets: list, steps: int, lr: float, seed: int,
           progress: bool, label: str) -> None:
    """AdamW on every parameter of `block` (in float32, its dtype restored after), a batch a step."""
    dtype = next(block.parameters()).dtype
    saved = {name: parameter.requires_grad for name, parameter in block.named_parameters()}
    block.float()
    parameters = list(block.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    power = sum(target.float().pow(2).mean().item() for target in targets) / len(targets)
    order, rng = [], random.Random(f"local-{seed}-{index}")
    try:
        for _ in tqdm(range(steps), desc=f"local {label}", leave=False, disable=not progress):
            if not order:
                order = list(range(len(inputs)))
                rng.shuffle(order)
            batch = order.pop()
            state = states[batch]
            with torch.enable_grad():
                out = forward.output_of(block(inputs[batch].float(), *_floats(state.args[index]),
                                              **_floats(state.kwargs[index])))
                loss = (out - targets[batch].float()).pow(2).mean() / power
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for name, parameter in block.named_parameters():
            parameter.requires_grad_(saved[name])
        block.to(dtype)


def _floats(value):
    """Floating tensors among a block's arguments (position embeddings, masks) in float32, as it trains."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_floats(item) for item in value)
    if isinstance(value, list):
        return [_floats(item) for item in value]
    if isinstance(value, dict):
        return {key: _floats(item) for key, item in value.items()}
    return value


def reconstruct(model, windows: torch.Tensor, removal_list: list, steps: int, lr: float, batch_size: int = 4,
                seed: int = 0, progress: bool = True) -> list:
    """Train the block before each removed run (see the module's docstring); the blocks stay in the model."""
    runs = check(removal_list, steps, lr)
    block_list = blocks.get_blocks(model)
    removed = set(removal_list)
    first_of = {run[0] - 1: run for run in runs}
    with torch.no_grad():
        batches = [batch.to(model.device) for batch in windows.split(batch_size)]
        states = [forward.capture(model, batch) for batch in batches]
        hidden = [state.hidden.clone() for state in states]
    found = []
    for index in range(len(block_list)):
        if index in removed:
            continue
        block = block_list[index]
        if index in first_of:
            run, started = first_of[index], time.perf_counter()
            with torch.no_grad():
                targets = [forward.run_blocks(block_list, [index, *run], h, state) for h, state in zip(hidden, states)]
            before = _relative_error(block, hidden, states, index, targets)
            _train(block, hidden, states, index, targets, steps, lr, seed, progress, f"block {index}")
            found.append(RunTraining(run, index, int(windows.numel()), steps, before,
                                     _relative_error(block, hidden, states, index, targets),
                                     round(time.perf_counter() - started, 3)))
            del targets
        with torch.no_grad():
            hidden = [forward.run_blocks(block_list, [index], h, state) for h, state in zip(hidden, states)]
    return found
