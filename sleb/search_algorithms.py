"""Which blocks to remove: SLEB's greedy search (metric 3) and the one-shot baselines it is compared with
(EvoPress's evolutionary search is sleb/evopress.py).

Every metric has one signature, `metric(job, state) -> state`, and is registered in sleb/metrics.py. The
metrics that compare calibration losses get an engine from the job (sleb/engines.py), whose loss is
the job's objective (sleb/objectives.py); after an engine has scored a phase, the greedy loop settles
near ties in a step of its own: candidates whose order float rounding could have decided are
re-scored the reference way, so every engine returns the reference engine's list. Removal lists are
original block indices in removal order (evopress's: sorted, it has no order).
"""

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from sleb import blocks, forward
from sleb.engines import Engine, PhaseResult, alive_blocks
from sleb.errors import UsageError, check_finite
from sleb.models import input_device


@dataclass
class SearchState:
    """Everything a search has decided so far; saved after each phase so a run can resume."""

    num_blocks: int
    removal_list: list = field(default_factory=list)
    # Per phase, one value per original block (None: not a candidate): the calibration loss for the
    # sleb metrics, Block Influence (1 - cos) for cosine, the angular distance of the run starting
    # there for angular.
    scores: list = field(default_factory=list)
    lower_bounds: list = field(default_factory=list)  # per phase: partial loss of abandoned candidates
    phase_seconds: list = field(default_factory=list)
    rescored: int = 0  # candidates re-scored the reference way to settle near ties
    max_rescore_gap: Optional[float] = None  # largest relative engine-vs-reference gap among them
    fits: list = field(default_factory=list)  # sleb_compensated: the chosen blocks' maps (linear.RunFit)
    generations: list = field(default_factory=list)  # evopress: {"generation", "best", "value", "seconds"} each

    @property
    def alive(self) -> list:
        return alive_blocks(self.num_blocks, self.removal_list)


@dataclass
class SearchJob:
    """What every metric is given."""

    model: object
    windows: torch.Tensor  # (windows, seqlen) calibration token ids
    num_remove_blocks: int
    early_barrier: int
    latter_barrier: int
    seed: int = 0
    batch_size: int = 1  # windows per forward where a metric runs the blocks itself
    build_engine: Optional[Callable[[], Engine]] = None
    on_phase: Callable = lambda state: None  # called after every phase of an iterative metric
    log: Callable = print
    progress: bool = True  # tqdm bars
    engine: Optional[Engine] = None  # built on first use
    kinds: Optional[list] = None  # each original block's kind: a search keeps one block of every kind
    evolution: Optional[object] = None  # evopress's settings (sleb/evopress.py's Evolution; defaults when None)

    def allowed(self, removal_list: list, block: int) -> bool:
        return blocks.keeps_every_kind(list(removal_list) + [block], self.kinds)

    def take(self, ranked: list, count: int) -> list:
        """The first `count` of `ranked` that together keep a block of every kind."""
        chosen = []
        for block in ranked:
            if len(chosen) < count and self.allowed(chosen, block):
                chosen.append(block)
        if len(chosen) < count:
            raise UsageError(f"only {len(chosen)} blocks can go while one block of every kind stays; remove fewer "
                             "or pass --keep_block_kinds False")
        return chosen

    def get_engine(self) -> Engine:
        if self.engine is None:
            self.engine = self.build_engine()
        return self.engine


def check_shape(depth: int, k: int, early_barrier: int, latter_barrier: int) -> None:
    """A search of k removals between the barriers of a depth-block model must have candidates in every phase."""
    available = depth - early_barrier - latter_barrier
    if available < 1:
        raise UsageError(f"barriers {early_barrier} + {latter_barrier} leave no candidate among "
                         f"{depth} blocks; lower --early_barrier or --latter_barrier")
    # The iterative search loses one candidate per phase; the last phase still needs one.
    if k >= available:
        raise UsageError(f"--num_remove_blocks {k} must be below the {available} blocks between the "
                         f"barriers of a {depth}-block model; remove fewer blocks")


def candidate_positions(alive_count: int, early_barrier: int, latter_barrier: int) -> range:
    """Positions in the alive list that may be removed: the paper's range(early, len - latter)."""
    return range(early_barrier, alive_count - latter_barrier)


def choose(losses: dict) -> int:
    """Smallest loss; ties go to the smallest position."""
    return min(losses, key=lambda position: (losses[position], position))


def rank(scores: dict) -> list:
    """Positions from the smallest score up; ties to the smallest position."""
    return sorted(scores, key=lambda position: (scores[position], position))


def near_ties(losses: dict, count: int, margin: float) -> list:
    """Positions whose order among the best `count` (or across the cut after them) rounding could decide.

    Neighbours in sorted order closer than `margin` (relative) form chains; every chain that reaches
    into the best `count`, and its continuation past the cut, is returned.
    """
    if margin <= 0:
        return []  # an engine whose losses are the reference's own has nothing to settle
    ordered = sorted((value, position) for position, value in losses.items() if value is not None)
    tied, chain_open = set(), False
    for index, ((a, first), (b, second)) in enumerate(zip(ordered, ordered[1:])):
        close = b - a <= margin * abs(a)
        if index >= count and not (close and chain_open):
            break
        if close:
            tied.update((first, second))
        chain_open = close
    return sorted(tied)


def settle_near_ties(engine: Engine, state: SearchState, losses: dict, count: int) -> dict:
    """`losses` with every near tie of the best `count` replaced by the reference engine's loss."""
    positions = near_ties(losses, count, engine.tie_margin)
    if not positions:
        return losses
    exact = engine.reference_losses(state.removal_list, positions)
    gap = max(abs(exact[p] - losses[p]) / abs(exact[p]) for p in positions)
    state.rescored += len(positions)
    state.max_rescore_gap = gap if state.max_rescore_gap is None else max(state.max_rescore_gap, gap)
    return {**losses, **exact}


def _check_phase(result: PhaseResult, alive: list, removal_list: list, model) -> None:
    for position, value in list(result.losses.items()) + list(result.lower_bounds.items()):
        if value is not None:
            after = f" after removing {removal_list}" if removal_list else ""
            check_finite(value, f"the calibration loss with block {alive[position]} removed{after}", model)


def _by_block(num_blocks: int, alive: list, by_position: dict) -> list:
    row = [None] * num_blocks
    for position, value in by_position.items():
        row[alive[position]] = value
    return row


def _allowed_positions(job: SearchJob, state: SearchState, alive: list) -> list:
    """This phase's candidates: between the barriers, and not the last block of a kind."""
    positions = [p for p in candidate_positions(len(alive), job.early_barrier, job.latter_barrier)
                 if job.allowed(state.removal_list, alive[p])]
    if not positions:
        raise UsageError(f"after removing {state.removal_list}, every candidate is the last block of its kind; "
                         "remove fewer or pass --keep_block_kinds False")
    return positions


def sleb_iterative(job: SearchJob, state: SearchState) -> SearchState:
    """SLEB metric 3: one block per phase, the one whose removal raises calibration loss least. The same
    loop is sleb_compensated: its engine (sleb/recovery/compensated.py) scores each candidate with its own
    map folded in and, told which one was chosen (`keep`), folds that map in for good."""
    engine = job.get_engine()
    keep = getattr(engine, "keep", None)
    k = job.num_remove_blocks
    while len(state.removal_list) < k:
        phase = len(state.removal_list)
        alive = state.alive
        positions = _allowed_positions(job, state, alive)
        started = time.perf_counter()
        bar = tqdm(total=len(positions), desc=f"phase {phase + 1}/{k}", leave=False, disable=not job.progress)
        best = [math.inf, None]

        def progress(position, loss):
            if loss is not None and loss < best[0]:
                best[:] = [loss, alive[position]]
            bar.update(1)
            bar.set_postfix_str(f"best block {best[1]} loss {best[0]:.3f}")

        result = engine.phase(state.removal_list, positions, order_hint=state.scores[-1] if state.scores else None,
                              progress=progress)
        bar.close()
        _check_phase(result, alive, state.removal_list, job.model)
        losses = settle_near_ties(engine, state, result.losses, count=1)
        position = choose({p: v for p, v in losses.items() if v is not None})
        if keep is not None:
            keep(state, position)
        seconds = time.perf_counter() - started
        state.scores.append(_by_block(state.num_blocks, alive, losses))
        state.lower_bounds.append(_by_block(state.num_blocks, alive, result.lower_bounds))
        state.phase_seconds.append(round(seconds, 3))
        state.removal_list.append(alive[position])
        into = f" with its map folded into block {alive[position - 1]}" if keep is not None else ""
        job.log(f"phase {phase + 1}/{k}: removed block {alive[position]}{into} "
                f"(loss {losses[position]:.4f}, {seconds:.1f} s); removal list {state.removal_list}")
        job.on_phase(state)
    return state


def sleb_oneshot(job: SearchJob, state: SearchState) -> SearchState:
    """Paper's metric 2: rank blocks once by their single-removal loss, remove the k best."""
    engine = job.get_engine()
    every = list(range(state.num_blocks))
    positions = list(candidate_positions(state.num_blocks, job.early_barrier, job.latter_barrier))
    started = time.perf_counter()
    bar = tqdm(total=len(positions), desc="single-removal losses", leave=False, disable=not job.progress)
    result = engine.phase([], positions, complete=True, progress=lambda p, v: bar.update(1))
    bar.close()
    _check_phase(result, every, [], job.model)
    losses = settle_near_ties(engine, state, result.losses, count=job.num_remove_blocks)
    ranked = rank(losses)
    state.scores.append(_by_block(state.num_blocks, every, losses))
    state.phase_seconds.append(round(time.perf_counter() - started, 3))
    state.removal_list = job.take(ranked, job.num_remove_blocks)
    job.log(f"one-shot ranking {ranked}; removal list {state.removal_list}")
    return state


@torch.inference_mode()
def _block_states(model, windows: torch.Tensor, batch_size: int, progress: bool = True):
    """Per batch of windows: [input of block 0, output of block 0, ..., output of the last block]."""
    device = input_device(model)
    for start in tqdm(range(0, len(windows), batch_size), desc="block similarities", leave=False,
                      disable=not progress):
        inputs = forward.capture(model, windows[start : start + batch_size].to(device), keep_outputs=True)
        yield [inputs.hidden] + inputs.outputs


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.float(), b.float().to(a.device), dim=-1).double().cpu()


def block_influence(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> list:
    """ShortGPT's Block Influence per block l: mean over all tokens of 1 - cos(input of l, output of l)."""
    depth = blocks.num_blocks(model)
    sums, tokens = torch.zeros(depth, dtype=torch.float64), 0
    for states in _block_states(model, windows, batch_size, progress):
        for first in range(depth):
            sums[first] += (1 - _cosine(states[first], states[first + 1])).sum()
        tokens += states[0].shape[0] * states[0].shape[1]
    return (sums / tokens).tolist()


def angular_distances(model, windows: torch.Tensor, span: int, batch_size: int = 1, progress: bool = True) -> list:
    """Gromov et al. per start l: mean over sequences of arccos(cos(h_l, h_{l+span})) / pi at the last token."""
    depth = blocks.num_blocks(model)
    sums = torch.zeros(depth - span + 1, dtype=torch.float64)
    for states in _block_states(model, windows, batch_size, progress):
        for first in range(depth - span + 1):
            cos = _cosine(states[first][:, -1], states[first + span][:, -1]).clamp(-1.0, 1.0)
            sums[first] += (torch.arccos(cos) / math.pi).sum()
    return (sums / len(windows)).tolist()


def cosine(job: SearchJob, state: SearchState) -> SearchState:
    """Paper's metric 1 / ShortGPT's Block Influence: remove the k blocks with the lowest influence."""
    influence_by_block = block_influence(job.model, job.windows, job.batch_size, job.progress)
    every = list(range(state.num_blocks))
    influence = {l: influence_by_block[l] for l in candidate_positions(state.num_blocks, job.early_barrier,
                                                                         job.latter_barrier)}
    for block, value in influence.items():
        check_finite(value, f"the block influence of block {block}", job.model)
    ranked = rank(influence)
    state.scores.append(_by_block(state.num_blocks, every, influence))
    state.removal_list = job.take(ranked, job.num_remove_blocks)
    job.log(f"block influence ranking {ranked}; removal list {state.removal_list}")
    return state


def angular(job: SearchJob, state: SearchState) -> SearchState:
    """Gromov et al.: remove the contiguous run of k blocks whose input and output are closest in angle."""
    k = job.num_remove_blocks
    by_start = angular_distances(job.model, job.windows, k, job.batch_size, job.progress)
    starts = range(job.early_barrier, state.num_blocks - job.latter_barrier - k + 1)
    distance = {l: by_start[l] for l in starts if blocks.keeps_every_kind(range(l, l + k), job.kinds)}
    if not distance:
        raise UsageError(f"every run of {k} blocks takes the last block of a kind; remove fewer or pass "
                         "--keep_block_kinds False")
    for start, value in distance.items():
        check_finite(value, f"the angular distance of the run from block {start}", job.model)
    best = choose(distance)
    state.scores.append(_by_block(state.num_blocks, list(range(state.num_blocks)), distance))
    state.removal_list = list(range(best, best + k))
    job.log(f"angular distance of runs of {k}: best starts at block {best}; removal list {state.removal_list}")
    return state


def random_choice(job: SearchJob, state: SearchState) -> SearchState:
    """Seeded uniform choice among the blocks between the barriers."""
    positions = list(candidate_positions(state.num_blocks, job.early_barrier, job.latter_barrier))
    generator = random.Random(job.seed)
    if job.kinds is None:
        state.removal_list = generator.sample(positions, job.num_remove_blocks)
    else:  # a seeded order of every candidate, then the first that keep a block of each kind
        state.removal_list = job.take(generator.sample(positions, len(positions)), job.num_remove_blocks)
    job.log(f"random (seed {job.seed}) removal list {state.removal_list}")
    return state
