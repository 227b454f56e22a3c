"""Scoring candidates with their compensation folded in (Prune&Comp's idea inside SLEB's greedy loop).

`CompensatedEngine` is an engine (sleb/engines.py) around another one, the fast or the reference
engine: the greedy loop of sleb/search_algorithms.py is the same, only a candidate's score differs. Removing
the alive block at position p, its least-squares map (sleb/recovery/linear.py) goes into the block
at p - 1; the candidate is scored by the inner engine with that map folded in meanwhile (`alter`),
so the fast engine reuses every state before block p - 1, and under torchrun each rank scores its own
slice of the candidates. The chosen candidate's map is folded in for good (`keep`).

Statistics: a candidate's sums (MᵀM, MᵀD: 2 x hidden² float64) come from one streaming pass over
the model as it stands, stopped after the deepest block needed, for as many candidates at once as
`budget_bytes` allows (more passes when it is small). Sums stay valid while nothing before the
candidate changed: after block r is removed and its map folded into block q, the sums of candidates
before q are reused in the next phase, the rest recomputed.

A candidate whose map is not finite, or whose compensated loss is not, is not compensable: scored as
None (never chosen), named in the log and in `stats()`; one bad candidate does not stop the search.
"""

import math
import time
from collections import OrderedDict
from typing import Optional

import torch

from sleb import blocks, memory
from sleb.engines import PhaseResult, alive_blocks
from sleb.errors import UsageError
from sleb.models import input_device
from sleb.recovery import linear

# When no budget is given: a quarter of what the device has free (CUDA) or of the machine's memory.
AUTO_SHARE = 0.25


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return memory.total_bytes()


def predecessors(depth: int, early_barrier: int, latter_barrier: int) -> range:
    """Original indices of every block that can stand before a removed candidate during the search."""
    return range(max(0, early_barrier - 1), max(0, depth - latter_barrier - 1))


def prove_all(model, windows: torch.Tensor, early_barrier: int, latter_barrier: int) -> dict:
    """{block: its proven Sublayer} for every block that could receive a map: the refusal (a norm after the
    sub-layer, a residual multiplier, an in-place add, offloaded or shared weights) comes before any long work."""
    if early_barrier < 1:
        raise UsageError("linear compensation folds each map into the block before the removed one; keep "
                         "--early_barrier at least 1")
    probe = windows[:1, :linear.PROBE_TOKENS].to(input_device(model))
    with torch.inference_mode():
        return {block: linear.last_sublayer(model, block, probe, str(block))
                for block in predecessors(blocks.num_blocks(model), early_barrier, latter_barrier)}


class CompensatedEngine:
    """Candidates scored with their own map folded into the block before them; see the module docstring."""

    def __init__(self, inner, model, windows: torch.Tensor, early_barrier: int, latter_barrier: int,
                 batch_size: int = 4, budget_gb: float = 0.0, progress: bool = True, log=print):
        self.inner = inner
        self.name = f"{inner.name}, compensated"
        self.tie_margin = inner.tie_margin
        self.model, self.windows, self.batch_size, self.progress, self.log = model, windows, batch_size, progress, log
        self.proven = prove_all(model, windows, early_barrier, latter_barrier)
        self.original = list(blocks.get_blocks(model))  # by original index: the search never edits the list
        hidden = model.get_input_embeddings().weight.shape[-1]
        self.per_candidate = linear.Normal.bytes(hidden)
        budget = budget_gb * 2**30 if budget_gb > 0 else AUTO_SHARE * _free_bytes(input_device(model))
        self.capacity = int(budget // self.per_candidate)
        if self.capacity < 1:
            raise UsageError(f"--compensation_gb {budget_gb:g} holds no candidate's sums ({self.per_candidate / 2**30:.3g} "
                             f"GiB each at hidden {hidden}: 2 x hidden² float64); give at least that")
        self.sums = OrderedDict()  # (block before, candidate block) -> linear.Normal, valid while both unchanged
        self.statistics_passes = 0
        self.sums_reused = 0
        self.not_compensable = []  # (phase's removal list, block) of candidates whose map or loss was not finite
        self.maps = {}  # position -> map, for the candidates being scored in the current group

    def _sublayer(self, before: int, position: int) -> linear.Sublayer:
        sublayer = self.proven[before]
        sublayer.block_index = position - 1  # in the model as it stands (earlier removals skipped)
        return sublayer

    def _fill(self, removal_list: list, alive: list, positions: list) -> None:
        """Compute the sums of `positions` in one pass (they fit the budget): the inner engine walks its cached
        states when it can (the blocks before the first candidate's predecessor are not run again), else the
        windows stream through the model as it stands."""
        walk = getattr(self.inner, "walk", None)
        if walk is not None:
            watched = {p: (self._sublayer(alive[p - 1], p).module, self.original[alive[p - 1]], self.original[alive[p]])
                       for p in positions}
            with linear.recording(watched) as found:
                walk(removal_list, min(positions) - 1, max(positions))
        else:
            with blocks.skipping(self.model, removal_list):
                found = linear.normal_equations_for_runs(
                    self.model, self.windows, {p: self._sublayer(alive[p - 1], p) for p in positions},
                    self.batch_size, self.progress, desc=f"statistics of {len(positions)} candidates")
        self.statistics_passes += 1
        for position, normal in found.items():
            self.sums[(alive[position - 1], alive[position])] = normal

    def _groups(self, removal_list: list, alive: list, positions: list):
        """Positions in groups whose sums are in memory, computing them within the budget as needed."""
        ready = [p for p in positions if (alive[p - 1], alive[p]) in self.sums]
        self.sums_reused += len(ready)
        if ready:
            yield ready
        todo = [p for p in positions if p not in ready]
        while todo:
            room = min(len(todo), self.capacity)
            while len(self.sums) + room > self.capacity:
                self.sums.popitem(last=False)  # the oldest: already scored, or stale
            group, todo = todo[:room], todo[room:]
            self._fill(removal_list, alive, group)
            yield group

    def _map(self, alive: list, position: int) -> Optional[torch.Tensor]:
        return self.sums[(alive[position - 1], alive[position])].solve(0.0)

    def _alter(self, alive: list):
        def fold(position):
            return linear.folded(self._sublayer(alive[position - 1], position).targets, self.maps[position])
        return fold

    def _score(self, removal_list, alive, group, score):
        """{position: loss} of a group with sums in memory; None for a candidate that is not compensable."""
        self.maps = {p: self._map(alive, p) for p in group}
        broken = [p for p in group if self.maps[p] is None]
        losses = score([p for p in group if p not in broken], self._alter(alive)) if len(broken) < len(group) else {}
        broken += [p for p, loss in losses.items() if loss is not None and not math.isfinite(loss)]
        for position in broken:
            losses[position] = None
            self.not_compensable.append((list(removal_list), alive[position]))
            self.log(f"note: block {alive[position]} cannot be compensated after removing {removal_list} (its map or "
                     "its compensated loss is not finite); scored as not compensable")
        self.maps = {}
        return losses

    def phase(self, removal_list, positions, order_hint=None, complete=False, progress=None, alter=None) -> PhaseResult:
        alive = alive_blocks(blocks.num_blocks(self.model), removal_list)
        result = PhaseResult({})
        for group in self._groups(removal_list, alive, list(positions)):
            def score(scored, fold):
                part = self.inner.phase(removal_list, scored, order_hint, complete, progress, fold)
                result.lower_bounds.update(part.lower_bounds)
                return part.losses
            result.losses.update(self._score(removal_list, alive, group, score))
        if positions and all(result.losses.get(p) is None and p not in result.lower_bounds for p in positions):
            raise UsageError(f"after removing {removal_list}, no candidate can be compensated (every map or loss is "
                             "not finite); try --dtype float32")
        return result

    def reference_losses(self, removal_list, positions, alter=None) -> dict:
        alive = alive_blocks(blocks.num_blocks(self.model), removal_list)
        losses = {}
        for group in self._groups(removal_list, alive, list(positions)):
            losses.update(self._score(removal_list, alive, group,
                                      lambda scored, fold: self.inner.reference_losses(removal_list, scored, fold)))
        return losses

    def keep(self, state, position: int) -> None:
        """Fold the chosen candidate's map in for good and record it; a map already in the removed block goes
        with it, and the new map stands for both runs. Sums that the change reaches are dropped."""
        started = time.perf_counter()
        alive = state.alive  # before the removal is recorded
        before, removed = alive[position - 1], alive[position]
        if (before, removed) not in self.sums:
            self._fill(state.removal_list, alive, [position])
        normal = self.sums[(before, removed)]
        T = normal.solve(0.0)
        sublayer = self._sublayer(before, position)
        with torch.no_grad():
            for target in sublayer.targets:
                linear.fold(target, T)
        run = sorted({removed}.union(*[fit.run for fit in state.fits if fit.before == removed]))
        state.fits = [fit for fit in state.fits if fit.before != removed]
        state.fits.append(linear.RunFit(run, before, normal.tokens, normal.residual(T), normal.identity_residual(),
                                        round(time.perf_counter() - started, 3),
                                        [f"{sublayer.name}.{target.name}" for target in sublayer.targets]))
        linear.record_change(self.model, [removed], before)
        for key in [key for key in self.sums if key[1] >= before]:
            del self.sums[key]  # the inputs or outputs of these candidates' blocks changed
        changed = getattr(self.inner, "changed", None)
        if changed is not None:
            changed([before])

    def stats(self) -> dict:
        return {**self.inner.stats(), "statistics_passes": self.statistics_passes, "sums_reused": self.sums_reused,
                "sums_capacity": self.capacity, "sums_bytes_each": self.per_candidate,
                "not_compensable": [{"removed_before": r, "block": b} for r, b in self.not_compensable]}
