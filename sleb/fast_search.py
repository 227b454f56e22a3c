"""The fast engine: the reference engine's losses and removal list with far fewer block forwards.

Three parts: `Storage` (where cached hidden states live, and how many bytes they may take),
`PrefixCache` (states keyed by the exact blocks run), and `FastEngine`, which captures the windows on
its first scoring call (never in its constructor) and scores phases and removal sets from the cache.

Exact tricks only:
- Prefix reuse: the hidden state entering alive block j does not depend on which candidate is
  skipped, so it is computed once per phase, kept across phases, and after a removal recomputed
  only from the removed position on. A candidate then runs only the blocks after it.
- Batched windows and float32 cross-entropy computed in chunks, under inference_mode.
- Early abandonment: a candidate's loss is a sum of non-negative per-window terms, so once its
  partial sum exceeds the best complete loss (with a margin for float noise) it cannot win.
  Candidates run in ascending order of their previous-phase loss so a strong one comes first.
- Near ties: the engine's `tie_margin` tells the search loop how far apart two of its losses must
  be for batching's float rounding not to matter; closer candidates are re-scored there with the
  reference engine's own batch-1 computation, so rounding never changes the answer.

Cached hidden states live on the model's device when they fit `cache_gb`, else in (pinned) CPU
memory, else they are recomputed batch by batch (no abandonment then).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from sleb import blocks, forward, memory
from sleb.engines import PhaseResult, ReferenceEngine, alive_blocks, altered, window_loss
from sleb.models import input_device

# Relative difference under which two losses count as a possible tie that rounding might decide:
# batched and batch-1 float32 sums agree to ~1e-7 here; half precision needs far more room.
TIE_MARGINS = {torch.float32: 1e-6, torch.float64: 1e-9}
HALF_TIE_MARGIN = 1e-3


@dataclass
class _Batch:
    ids: torch.Tensor  # (b, seqlen) on the model's input device
    inputs: forward.BlockInputs
    rows: list  # the windows' indices in the calibration tensor


def cache_bytes(model, windows: torch.Tensor, positions: int) -> int:
    """Bytes needed to keep `positions` hidden states of all windows."""
    hidden = model.config.get_text_config().hidden_size
    itemsize = next(model.parameters()).element_size()
    return positions * windows.numel() * hidden * itemsize


@dataclass
class Storage:
    """Where cached hidden states live ("device", "cpu": pinned host memory, or None: recomputed) and how
    many bytes they may take."""

    where: Optional[str]
    budget_bytes: float

    @classmethod
    def choose(cls, model, windows: torch.Tensor, num_blocks: int, cache_gb: float) -> "Storage":
        """The prefix states of a phase (one per block) must fit; states of candidates' paths use the rest."""
        needed = cache_bytes(model, windows, num_blocks)
        device = input_device(model)
        if cache_gb <= 0:  # auto: a share of what the device (or, on CPU, the machine) has free
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                cache_gb = 0.5 * free / 2**30
            else:
                cache_gb = 0.25 * memory.total_bytes() / 2**30
        budget = cache_gb * 2**30
        if needed <= budget:
            return cls("device", budget)
        host_budget = 0.25 * memory.total_bytes()
        if device.type == "cuda" and needed <= host_budget:
            return cls("cpu", host_budget)
        return cls(None, 0)

    def store(self, tensor):
        if self.where == "cpu" and tensor.device.type == "cuda":
            return tensor.to("cpu", non_blocking=True).pin_memory()
        return tensor

    @staticmethod
    def load(tensor, like):
        return tensor.to(like.device, non_blocking=True) if tensor.device != like.device else tensor


class PrefixCache:
    """Hidden states keyed by (batch index, the exact blocks run in order), within a Storage's budget: a hit
    is the very same computation."""

    def __init__(self, storage: Storage, itemsize: int):
        self.storage, self.itemsize = storage, itemsize
        self.states = {}
        self.bytes = 0

    def keep(self, b: int, path: tuple, hidden) -> None:
        """Cache the state after `path` on batch b while the budget allows."""
        size = hidden.numel() * self.itemsize
        if (b, path) not in self.states and self.bytes + size <= self.storage.budget_bytes:
            self.states[(b, path)] = self.storage.store(hidden)
            self.bytes += size

    def longest(self, b: int, path: list, limit: int, like) -> tuple:
        """(k, the state after path[:k]) for the longest cached prefix of at most `limit` blocks; (0, None)."""
        k = limit
        while k > 0 and (b, tuple(path[:k])) not in self.states:
            k -= 1
        return (k, self.storage.load(self.states[(b, tuple(path[:k]))], like)) if k else (0, None)

    def forget(self, changed_blocks) -> None:
        """Drop the states whose path ran any of these blocks (removed, or their weights changed)."""
        changed_blocks = set(changed_blocks)
        for key in [key for key in self.states if changed_blocks.intersection(key[1])]:
            self.bytes -= self.states.pop(key).numel() * self.itemsize


class FastEngine:
    name = "fast"

    @staticmethod
    def cannot_follow(model):
        """Why the engine cannot split this model at its blocks (it applies the tail and head itself),
        or None when it can."""
        return forward.cannot_follow(model)

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 4, cache_gb: float = 0.0,
                 abandon: bool = True, objective=None):
        """Nothing runs here: the windows are captured on the first scoring call."""
        self.model = model
        self.windows = windows
        self.batch_size = max(1, batch_size)
        self.abandon = abandon
        self.objective = objective  # None: the paper's cross-entropy
        self.tie_margin = TIE_MARGINS.get(blocks.compute_dtype(model), HALF_TIE_MARGIN)
        self.reference = ReferenceEngine(model, windows, objective)
        self.blocks = self.reference.blocks  # its own references: a later change to the model's list is not followed
        self.num_blocks = len(self.blocks)
        self.storage = Storage.choose(model, windows, self.num_blocks, cache_gb)
        self.cache = PrefixCache(self.storage, next(model.parameters()).element_size())
        self.block_forwards = 0
        self._captured = None

    @property
    def batches(self) -> list:
        """The windows in batches with what the model hands each block (captured once, by one dense
        forward per batch, whose block outputs are the first phase's prefix states)."""
        if self._captured is None:
            self._captured = []
            device = input_device(self.model)
            with torch.inference_mode():
                for start in range(0, len(self.windows), self.batch_size):
                    ids = self.windows[start : start + self.batch_size].to(device)
                    inputs = forward.capture(self.model, ids, keep_outputs=self.storage.where is not None)
                    self.block_forwards += self.num_blocks * len(ids)
                    self._captured.append(_Batch(ids, inputs, list(range(start, start + len(ids)))))
                    for depth, hidden in enumerate((inputs.outputs or [])[:-1]):
                        self.cache.keep(len(self._captured) - 1, tuple(range(depth + 1)), hidden)
                    inputs.outputs = None
        return self._captured

    def _run(self, indices, hidden, batch):
        self.block_forwards += len(indices) * len(batch.ids)
        return forward.run_blocks(self.blocks, indices, hidden, batch.inputs)

    def _window_terms(self, hidden, batch) -> list:
        """The per-window term (mean over predicted positions x seqlen) of the objective, for each window."""
        seqlen = batch.ids.shape[1]
        term = None if self.objective is None else (
            lambda logits, start, stop: self.objective.chunk_sums(logits, batch.rows, start, stop))
        sums = forward.tail_nll_sums(self.model, hidden, batch.inputs, batch.ids, term)
        return [window_loss(float(s) / (seqlen - 1), seqlen) for s in sums.double().cpu()]

    def changed(self, changed_blocks) -> None:
        """Blocks removed, or whose weights changed: no cached state that ran them is used again."""
        self.cache.forget(changed_blocks)

    def _run_path(self, path: list, b: int, batch: _Batch, trusted: int = None) -> torch.Tensor:
        """The hidden state after running blocks `path` in order on batch b.

        Starts from the longest cached prefix of the path and caches each new intermediate state
        while the budget allows. Keys are the exact block sequences run, so a hit is the very same
        computation: the prefix shared by all candidates of a phase, and, after block r is removed,
        a candidate j < r's own path up to r, both come back from the cache. Only the first `trusted`
        blocks of the path run as cached (the block after them is altered meanwhile): no state from
        them on is read or kept.
        """
        trusted = len(path) if trusted is None else trusted
        start, hidden = self.cache.longest(b, path, trusted, batch.ids)
        hidden = hidden if start else batch.inputs.hidden
        for k in range(start, len(path)):
            hidden = self._run([path[k]], hidden, batch)
            if k + 1 < len(path) and k + 1 <= trusted:
                self.cache.keep(b, tuple(path[: k + 1]), hidden)
        return hidden

    @torch.inference_mode()
    def walk(self, removal_list, first: int, last: int) -> None:
        """Run every batch through the alive blocks at positions first..last of the model as it stands
        (for hooks that record what those blocks see), resuming from the cached state before `first`; the
        states walked are kept for the next phase. Before the capture, with nothing removed, the capture's
        dense forward is that walk."""
        if self._captured is None and not removal_list:
            self.batches
            return
        alive = alive_blocks(self.num_blocks, removal_list)
        self.changed(removal_list)
        for b, batch in enumerate(self.batches):
            hidden = self._run_path(alive[:first], b, batch) if first else batch.inputs.hidden
            for k in range(first, last + 1):
                hidden = self._run([alive[k]], hidden, batch)
                if k < last:
                    self.cache.keep(b, tuple(alive[: k + 1]), hidden)

    @torch.inference_mode()
    def phase(self, removal_list, positions, order_hint=None, complete=False, progress=None, alter=None) -> PhaseResult:
        """Losses of the candidate positions; a candidate is abandoned (None, with its partial sum as
        lower bound) once it cannot win, unless `complete`. Under `alter`, a candidate reuses the states
        before the block in front of it and runs that block (altered) and the rest."""
        alive = alive_blocks(self.num_blocks, removal_list)
        positions = list(positions)
        if not positions:
            return PhaseResult({})
        if self.storage.where is None:
            return PhaseResult(self._streamed_losses(alive, positions, progress, alter))
        self.changed(removal_list)
        # The prefix every candidate shares is cached first, so the budget never goes to suffixes instead.
        for b, batch in enumerate(self.batches):
            self._run_path(alive[: max(positions) + 1], b, batch)
        # Strongest candidates first (by last phase's loss), so abandonment bites early.
        order = sorted(positions, key=lambda p: (_previous_loss(order_hint, alive[p]), p))
        losses, lower_bounds = {}, {}
        best = math.inf
        for position in order:
            path = alive[:position] + alive[position + 1 :]
            total = 0.0
            abandoned = False
            with altered(alter, position):
                for b, batch in enumerate(self.batches):
                    hidden = self._run_path(path, b, batch, position - 1 if alter is not None else None)
                    total += sum(self._window_terms(hidden, batch))
                    if self.abandon and not complete and total > best * (1 + self.tie_margin):
                        abandoned = b < len(self.batches) - 1
                        break
            if abandoned:
                losses[position] = None
                lower_bounds[position] = total
            else:
                losses[position] = total
                best = min(best, total)
            if progress is not None:
                progress(position, losses[position])
        return PhaseResult(losses, lower_bounds)

    def _streamed_losses(self, alive, positions, progress, alter=None):
        """No cache: walk each batch through the alive blocks once, branching off every candidate (under
        `alter`, from the state before the block in front of it)."""
        losses = {p: 0.0 for p in positions}
        last = max(positions)
        for batch in self.batches:
            hidden, before = batch.inputs.hidden, None  # entering block `position`, and the one before it
            for position in range(last + 1):
                if position in losses:
                    with altered(alter, position):
                        if alter is None:
                            out = self._run(alive[position + 1 :], hidden, batch)
                        else:
                            out = self._run([alive[position - 1]] + alive[position + 1 :], before, batch)
                        losses[position] += sum(self._window_terms(out, batch))
                if position < last:
                    before, hidden = hidden, self._run([alive[position]], hidden, batch)
        if progress is not None:
            for position in positions:
                progress(position, losses[position])
        return losses

    def reference_losses(self, removal_list, positions, alter=None) -> dict:
        return self.reference.reference_losses(removal_list, positions, alter)

    @property
    def batch_count(self) -> int:
        return len(self.batches)

    @torch.inference_mode()
    def set_loss(self, skipped, batches: list) -> float:
        """The loss with the blocks `skipped` (original indices) removed, over the given batches: each batch
        resumes from the longest cached prefix its path shares with paths run before."""
        removed = set(skipped)
        path = [i for i in range(self.num_blocks) if i not in removed]
        total = 0.0
        for b in batches:
            batch = self.batches[b]
            total += sum(self._window_terms(self._run_path(path, b, batch), batch))
        return total

    def set_losses(self, sets: list, batches: list) -> list:
        return [self.set_loss(skipped, batches) for skipped in sets]

    def stats(self) -> dict:
        return {"block_forwards": self.block_forwards, "batch_size": self.batch_size, "cache": self.storage.where,
                "peak_mem_mb": memory.peak_mb(input_device(self.model))}


def _previous_loss(previous, block: int) -> float:
    if previous is None or previous[block] is None:
        return math.inf
    return previous[block]
