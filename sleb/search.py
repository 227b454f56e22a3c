"""Which blocks to remove: SLEB's greedy search (metric 3) and the baselines it is compared with.

The reference engine is the paper's algorithm written as plainly as possible: for every candidate,
skip it (on top of the blocks already removed), run every calibration window through the whole model
as a batch-1 forward and sum mean cross-entropy x seqlen. The fast engine (sleb/fast_search.py) must
return the same list; tests hold it to this one.
"""

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from sleb import blocks, stream
from sleb.errors import UsageError, check_at_least
from sleb.models import input_device

METRICS = ("sleb", "sleb_oneshot", "cosine", "angular", "random")


@dataclass
class SearchState:
    """Everything a search has decided so far; saved after each phase so a run can resume."""

    num_blocks: int
    removal_list: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # per phase: loss per original block, None if not computed
    lower_bounds: list = field(default_factory=list)  # per phase: partial loss of abandoned candidates
    phase_seconds: list = field(default_factory=list)

    @property
    def alive(self) -> list:
        return [i for i in range(self.num_blocks) if i not in self.removal_list]


def candidate_positions(alive_count: int, early_barrier: int, latter_barrier: int) -> range:
    """Positions in the alive list that may be removed: the paper's range(early, len - latter)."""
    return range(early_barrier, alive_count - latter_barrier)


def check_search_flags(depth: int, num_remove_blocks: int, early_barrier: int, latter_barrier: int,
                       metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    if early_barrier < 0 or latter_barrier < 0:
        raise UsageError(f"barriers must be >= 0, got --early_barrier {early_barrier} --latter_barrier {latter_barrier}")
    check_at_least("num_remove_blocks", num_remove_blocks, 1)
    available = depth - early_barrier - latter_barrier
    if available < 1:
        raise UsageError(f"barriers {early_barrier} + {latter_barrier} leave no candidate among {depth} blocks; "
                         "lower --early_barrier or --latter_barrier")
    # The iterative search loses one candidate per phase; the last phase still needs one.
    if num_remove_blocks >= available:
        raise UsageError(f"--num_remove_blocks {num_remove_blocks} must be below the {available} blocks between the "
                         f"barriers of a {depth}-block model; remove fewer blocks")


def window_loss(mean_ce: float, seqlen: int) -> float:
    """The paper's per-window term: mean next-token cross-entropy x seqlen."""
    return mean_ce * seqlen


class ReferenceEngine:
    """The paper's loop, unchanged in substance: batch-1 full forwards with the candidate skipped."""

    name = "reference"

    def __init__(self, model, windows: torch.Tensor):
        self.model = model
        self.windows = windows

    @torch.inference_mode()
    def loss(self, skipped: list) -> float:
        device = input_device(self.model)
        total = 0.0
        with blocks.skipping(self.model, skipped):
            for window in self.windows:
                inputs = window.unsqueeze(0).to(device)
                logits = self.model(input_ids=inputs, use_cache=False).logits
                shift_logits = logits[:, :-1, :].contiguous()
                ce = nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                                           inputs[:, 1:].reshape(-1).to(logits.device))
                total += window_loss(ce.item(), inputs.shape[1])
        return total

    def phase_losses(self, state: SearchState, positions, previous=None, exhaustive=False, progress=None,
                     settle=True):
        """({position: loss}, {}) for every candidate position of this phase (all computed in full)."""
        alive = state.alive
        out = {}
        for position in positions:
            out[position] = self.loss(state.removal_list + [alive[position]])
            if progress is not None:
                progress(position, out[position])
        return out, {}

    def settle_ties(self, state, losses: dict) -> dict:
        return losses  # already the reference computation


def choose(losses: dict) -> int:
    """Smallest loss; ties go to the smallest position."""
    return min(losses, key=lambda position: (losses[position], position))


def greedy_search(engine, state: SearchState, num_remove_blocks: int, early_barrier: int, latter_barrier: int,
                  on_phase=None, log=print) -> SearchState:
    """SLEB metric 3: one block per phase, the one whose removal raises calibration loss least."""
    while len(state.removal_list) < num_remove_blocks:
        phase = len(state.removal_list)
        alive = state.alive
        positions = candidate_positions(len(alive), early_barrier, latter_barrier)
        previous = state.losses[-1] if state.losses else None
        started = time.perf_counter()
        bar = tqdm(total=len(positions), desc=f"phase {phase + 1}/{num_remove_blocks}", leave=False)
        best = [math.inf, None]

        def progress(position, loss):
            if loss is not None and loss < best[0]:
                best[:] = [loss, alive[position]]
            bar.update(1)
            bar.set_postfix_str(f"best block {best[1]} loss {best[0]:.3f}")

        losses, lower_bounds = engine.phase_losses(state, positions, previous=previous, progress=progress)
        bar.close()
        position = choose({p: v for p, v in losses.items() if v is not None})
        seconds = time.perf_counter() - started
        state.losses.append(_by_block(state.num_blocks, alive, losses))
        state.lower_bounds.append(_by_block(state.num_blocks, alive, lower_bounds))
        state.phase_seconds.append(round(seconds, 3))
        state.removal_list.append(alive[position])
        log(f"phase {phase + 1}/{num_remove_blocks}: removed block {alive[position]} "
            f"(loss {losses[position]:.4f}, {seconds:.1f} s); removal list {state.removal_list}")
        if on_phase is not None:
            on_phase(state)
    return state


def _by_block(num_blocks: int, alive: list, by_position: dict) -> list:
    row = [None] * num_blocks
    for position, value in by_position.items():
        row[alive[position]] = value
    return row


def oneshot_search(engine, state: SearchState, num_remove_blocks: int, early_barrier: int, latter_barrier: int,
                   log=print) -> SearchState:
    """Paper's metric 2: rank blocks once by their single-removal loss, remove the k best."""
    positions = candidate_positions(state.num_blocks, early_barrier, latter_barrier)
    started = time.perf_counter()
    bar = tqdm(total=len(positions), desc="single-removal losses", leave=False)
    losses, _ = engine.phase_losses(state, positions, exhaustive=True, progress=lambda p, v: bar.update(1))
    bar.close()
    ranked = sorted(losses, key=lambda position: (losses[position], position))
    state.losses.append(_by_block(state.num_blocks, list(range(state.num_blocks)), losses))
    state.phase_seconds.append(round(time.perf_counter() - started, 3))
    state.removal_list = ranked[:num_remove_blocks]
    log(f"one-shot ranking {ranked}; removal list {state.removal_list}")
    return state


@torch.inference_mode()
def similarity_scores(model, windows: torch.Tensor, span: int, batch_size: int = 1) -> list:
    """For each l: mean over tokens of cos(input of block l, output of block l+span-1)."""
    depth = blocks.num_blocks(model)
    device = input_device(model)
    sums = torch.zeros(depth - span + 1, dtype=torch.float64)
    tokens = 0
    for start in tqdm(range(0, len(windows), batch_size), desc="block similarities", leave=False):
        batch = windows[start : start + batch_size].to(device)
        inputs = stream.capture(model, batch)
        states = [inputs.hidden]
        for index in range(depth):
            states.append(stream.run_block(model, index, states[-1], inputs))
        for first in range(depth - span + 1):
            a, b = states[first].float(), states[first + span].float().to(states[first].device)
            sums[first] += nn.functional.cosine_similarity(a, b, dim=-1).double().sum().cpu()
        tokens += batch.numel()
    return (sums / tokens).tolist()


def cosine_search(model, windows, state, num_remove_blocks, early_barrier, latter_barrier, batch_size=1, log=print):
    """Paper's metric 1 / ShortGPT's Block Influence: remove the k blocks with lowest mean 1 - cos(in, out)."""
    similarity = similarity_scores(model, windows, 1, batch_size)
    influence = {l: 1.0 - similarity[l] for l in candidate_positions(state.num_blocks, early_barrier, latter_barrier)}
    ranked = sorted(influence, key=lambda l: (influence[l], l))
    state.losses.append(_by_block(state.num_blocks, list(range(state.num_blocks)), influence))
    state.removal_list = ranked[:num_remove_blocks]
    log(f"block influence ranking {ranked}; removal list {state.removal_list}")
    return state


def angular_search(model, windows, state, num_remove_blocks, early_barrier, latter_barrier, batch_size=1, log=print):
    """Gromov et al.: remove the contiguous run of k blocks whose input and output are closest in angle."""
    k = num_remove_blocks
    similarity = similarity_scores(model, windows, k, batch_size)
    starts = range(early_barrier, state.num_blocks - latter_barrier - k + 1)
    if len(starts) == 0:
        raise UsageError(f"no run of {k} blocks fits between the barriers; remove fewer blocks")
    distance = {l: math.acos(max(-1.0, min(1.0, similarity[l]))) / math.pi for l in starts}
    best = min(distance, key=lambda l: (distance[l], l))
    state.losses.append(_by_block(state.num_blocks, list(range(state.num_blocks)), distance))
    state.removal_list = list(range(best, best + k))
    log(f"angular distance of runs of {k}: best starts at block {best}; removal list {state.removal_list}")
    return state


def random_search(state, num_remove_blocks, early_barrier, latter_barrier, seed, log=print):
    """Seeded uniform choice among the blocks between the barriers."""
    positions = list(candidate_positions(state.num_blocks, early_barrier, latter_barrier))
    state.removal_list = random.Random(seed).sample(positions, num_remove_blocks)
    log(f"random (seed {seed}) removal list {state.removal_list}")
    return state
