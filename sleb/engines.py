"""What a search engine is: it scores the candidates of one phase; the reference engine is the paper's loop.

An engine answers four questions. `phase` scores candidate positions (skipping each on top of the
blocks already removed) and may abandon a candidate that can no longer win; `reference_losses`
re-scores given candidates the reference way, batch-1, so the search loop can settle near ties;
`set_losses` scores whole removal sets on some of the calibration batches (evopress); and `stats`
reports what it did. Both scoring calls take `alter`: position -> a context manager that
changes the weights of the alive block before that candidate while it is scored (a compensation map
folded in, sleb/recovery/compensated.py); the blocks before it are unchanged, so their outputs may
be reused. `tie_margin` is the relative gap under which two of its losses could
have been ordered by float rounding (0 for the reference engine itself).

The reference engine is the paper's algorithm written as plainly as possible: for every candidate,
skip it, run every calibration window through the whole model as a batch-1 forward and sum mean
cross-entropy x seqlen. The fast engine (sleb/fast_search.py) must return the same list.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn

from sleb import blocks
from sleb.models import input_device


@dataclass
class PhaseResult:
    """One phase's candidate scores, by position in the alive list."""

    losses: dict  # position -> loss, or None if abandoned
    lower_bounds: dict = field(default_factory=dict)  # position -> partial loss of an abandoned candidate


Progress = Optional[Callable[[int, Optional[float]], None]]
Alter = Optional[Callable[[int], object]]  # position -> context manager changing block position - 1 meanwhile


def altered(alter: Alter, position: int):
    return alter(position) if alter is not None else contextlib.nullcontext()


class Engine(Protocol):
    name: str
    tie_margin: float

    def phase(self, removal_list: list, positions: list, order_hint: Optional[list] = None,
              complete: bool = False, progress: Progress = None, alter: Alter = None) -> PhaseResult:
        """Score every position; `complete` forbids abandoning; `order_hint` is last phase's row."""

    def reference_losses(self, removal_list: list, positions: list, alter: Alter = None) -> dict:
        """{position: the reference engine's loss} for the given positions."""

    batch_count: int  # how many batches of windows `set_losses` can be asked about

    def set_losses(self, sets: list, batches: list) -> list:
        """Each set's loss (blocks given by original index skipped) over the given batches (evopress)."""

    def stats(self) -> dict:
        """Counters for the results file (empty when there is nothing to say)."""


def window_loss(mean_ce: float, seqlen: int) -> float:
    """The paper's per-window term: mean next-token cross-entropy x seqlen."""
    return mean_ce * seqlen


def alive_blocks(num_blocks: int, removal_list: list) -> list:
    removed = set(removal_list)
    return [i for i in range(num_blocks) if i not in removed]


class ReferenceEngine:
    """The paper's loop, unchanged in substance: batch-1 full forwards with the candidate skipped."""

    name = "reference"
    tie_margin = 0.0

    def __init__(self, model, windows: torch.Tensor, objective=None):
        self.model = model
        self.windows = windows
        self.objective = objective  # None: the paper's cross-entropy, computed as its code computes it
        self.blocks = list(blocks.get_blocks(model))
        self.num_blocks = len(self.blocks)

    @torch.inference_mode()
    def loss(self, skipped: list, rows=None) -> float:
        """The objective's sum of per-window terms with `skipped` removed, over windows `rows` (default all)."""
        current = blocks.get_blocks(self.model)
        if len(current) != self.num_blocks or any(a is not b for a, b in zip(current, self.blocks)):
            raise RuntimeError("the model's blocks changed after this engine was built; build a new engine")
        device = input_device(self.model)
        total = 0.0
        with blocks.skipping(self.model, skipped):
            for row in range(len(self.windows)) if rows is None else rows:
                inputs = self.windows[row].unsqueeze(0).to(device)
                logits = self.model(input_ids=inputs, use_cache=False).logits
                shift_logits = logits[:, :-1, :].contiguous()
                if self.objective is None:
                    ce = nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                                               inputs[:, 1:].reshape(-1).to(logits.device))
                    total += window_loss(ce.item(), inputs.shape[1])
                else:
                    position_sum = self.objective.chunk_sums(shift_logits.float(), [row], 0, inputs.shape[1] - 1)
                    total += window_loss(position_sum.item() / (inputs.shape[1] - 1), inputs.shape[1])
        return total

    @property
    def batch_count(self) -> int:
        return len(self.windows)  # batch-1: one window per batch

    def set_loss(self, skipped: list, batches: list) -> float:
        """The loss with the blocks `skipped` (original indices) removed, over the given batches of windows."""
        return self.loss(list(skipped), rows=batches)

    def set_losses(self, sets: list, batches: list) -> list:
        return [self.set_loss(skipped, batches) for skipped in sets]

    def phase(self, removal_list, positions, order_hint=None, complete=False, progress=None, alter=None) -> PhaseResult:
        losses = self.reference_losses(removal_list, positions, alter, progress)
        return PhaseResult(losses)

    def reference_losses(self, removal_list, positions, alter=None, progress=None) -> dict:
        alive = alive_blocks(self.num_blocks, removal_list)
        losses = {}
        for position in positions:
            with altered(alter, position):
                losses[position] = self.loss(removal_list + [alive[position]])
            if progress is not None:
                progress(position, losses[position])
        return losses

    def stats(self) -> dict:
        return {}
