"""EvoPress's depth search (Sieberling et al., ICML 2025): a (1 + lambda) evolution over which k blocks
are removed, scored on the search's objective by the same engines as SLEB's greedy loop, which also gives
it its first parent.

Removed blocks are skipped, as every search here scores them, never deleted; mutations keep the barriers
and the block kinds. With the greedy list in every last stage of the first generation, the answer is never
worse than the greedy list on the calibration data. The fast engine resumes each set's batches from the
longest cached prefix of blocks it shares with sets scored before (a child shares its parent's path up to
its first swap)."""

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from sleb import blocks
from sleb.errors import UsageError, check_finite
from sleb.search_algorithms import SearchJob, SearchState, candidate_positions, sleb_iterative


@dataclass(frozen=True)
class Evolution:
    """EvoPress's depth search (Sieberling et al., ICML 2025), its defaults scaled to the calibration data."""

    generations: Optional[int] = None  # None: k (n - k) / 1.5, rounded up, for k of n blocks removed
    offspring: int = 32  # children per generation
    survivors: int = 2  # children that go on from the first selection stage to the last
    first_stage_share: float = 1 / 16  # of the calibration batches the first stage scores on (at least one)
    max_mutations: int = 3  # level-switch swaps per child, 1 to this many
    initial: int = 64  # random valid sets beside the greedy list in the first population
    greedy_start: bool = True  # False: the first population is random sets only, as EvoPress's own code starts
    start: Optional[tuple] = None  # the greedy list found before on the same model and windows: not searched again

    def record(self) -> dict:
        """These settings as the results file keeps them (and a resumed search must match)."""
        return {**dataclasses.asdict(self), "start": None if self.start is None else [int(b) for b in self.start]}

    def check(self) -> None:
        if not isinstance(self.greedy_start, bool):
            raise UsageError(f"--evo_greedy_start must be True or False, got {self.greedy_start!r}")
        if not self.greedy_start and self.initial < 1:
            raise UsageError("--evo_greedy_start False starts from --evo_initial random sets; give at least 1")
        if self.start is not None and not self.greedy_start:
            raise UsageError("a given start list is the greedy start; keep greedy_start True")
        for name, minimum in (("offspring", 1), ("survivors", 1), ("max_mutations", 1), ("initial", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UsageError(f"--evo_{name} must be an integer >= {minimum}, got {value!r}")
        if self.generations is not None and (not isinstance(self.generations, int) or self.generations < 0):
            raise UsageError(f"--evo_generations must be an integer >= 0, got {self.generations!r}")
        if not 0 < self.first_stage_share <= 1:
            raise UsageError(f"--evo_first_stage_share must be in (0, 1], got {self.first_stage_share!r}")


def evopress(job: SearchJob, state: SearchState) -> SearchState:
    """EvoPress's (1 + lambda) evolution over which k blocks are removed, on the job's objective (see the
    module's docstring). Offspring are level-switch mutations of the parent (`_children`); multi-step
    selection scores them all on a random share of the calibration batches, the best `survivors` and the
    parent (elitism) on all of them, and the best becomes the parent. The first population is SLEB's greedy
    list plus `initial` random valid sets, the greedy list always in the last stage (`greedy_start` False:
    random sets only). Each generation's best set and value is recorded and saved; generation g's generator
    is seeded with (seed, g), so a resumed run follows the same path."""
    engine = job.get_engine()
    evolution = job.evolution or Evolution()
    n, k = state.num_blocks, job.num_remove_blocks
    candidates = list(candidate_positions(n, job.early_barrier, job.latter_barrier))
    generations = evolution.generations if evolution.generations is not None else math.ceil(k * (n - k) / 1.5)
    every = list(range(engine.batch_count))
    first = max(1, math.ceil(evolution.first_stage_share * len(every)))
    full = {}  # set -> its loss on every batch

    def valid(removed) -> bool:
        return len(set(removed)) == k and blocks.keeps_every_kind(list(removed), job.kinds)

    def losses(sets, batches) -> list:
        """Each set's loss over `batches` (under torchrun the ranks split the sets)."""
        values = engine.set_losses([sorted(removed) for removed in sets], batches)
        for removed, value in zip(sets, values):
            check_finite(value, f"the calibration loss with blocks {sorted(removed)} removed", job.model)
        return values

    def on_all(sets) -> list:
        """Each set's loss on every batch, each set scored once in the whole search."""
        missing = list(dict.fromkeys(c for c in sets if c not in full))
        full.update(zip(missing, losses(missing, every)))
        return [full[c] for c in sets]

    def select(children, rng, kept) -> tuple:
        """The best of `children` after the two stages, `kept` (the parent or the greedy list; None: no such
        set) always in the last."""
        children = list(dict.fromkeys(tuple(sorted(c)) for c in children if tuple(sorted(c)) != kept))
        sample = sorted(rng.sample(every, first))
        stage = [c for _, c in sorted(zip(losses(children, sample), children))][:evolution.survivors]
        finalists = ([kept] if kept is not None else []) + stage
        return min(zip(on_all(finalists), finalists))[1]

    if not state.generations:
        started = time.perf_counter()
        greedy = _greedy_start(job, n, evolution.start) if evolution.greedy_start else None
        if greedy is not None and (not valid(greedy) or not set(greedy) <= set(candidates)):
            raise UsageError(f"the evopress start {list(greedy)} is not {k} distinct candidate blocks of {n}")
        rng = random.Random(f"{job.seed}-0")
        population = [c for c in (tuple(sorted(rng.sample(candidates, k))) for _ in range(evolution.initial))
                      if valid(c)]
        if not population and greedy is None:
            raise UsageError(f"evopress drew no valid set in {evolution.initial} tries (every one breaks a block "
                             "kind); raise --evo_initial or keep --evo_greedy_start True")
        parent = select(population, rng, greedy)
        state.generations.append({"generation": 0, "best": list(parent), "value": on_all([parent])[0],
                                  "greedy": list(greedy) if greedy else None,
                                  "greedy_value": on_all([greedy])[0] if greedy else None,
                                  "seconds": round(time.perf_counter() - started, 3)})
        job.on_phase(state)
    parent = tuple(state.generations[-1]["best"])
    full[parent] = state.generations[-1]["value"]
    bar = tqdm(total=generations, initial=len(state.generations) - 1, desc="evopress generations", leave=False,
               disable=not job.progress)
    for generation in range(len(state.generations), generations + 1):
        started = time.perf_counter()
        rng = random.Random(f"{job.seed}-{generation}")
        parent = select(_children(parent, candidates, evolution, rng, valid), rng, parent)
        state.generations.append({"generation": generation, "best": list(parent), "value": full[parent],
                                  "seconds": round(time.perf_counter() - started, 3)})
        bar.update(1)
        bar.set_postfix_str(f"best {list(parent)} loss {full[parent]:.3f}")
        job.on_phase(state)
    bar.close()
    state.removal_list = list(parent)
    start = state.generations[0]
    job.log(f"evopress: {generations} generations of {evolution.offspring}; removal list {state.removal_list} "
            f"(loss {full[parent]:.4f}" + (f"; the greedy list {start['greedy']} had {start['greedy_value']:.4f})"
                                            if start["greedy"] else ")"))
    return state


def _greedy_start(job: SearchJob, depth: int, given: Optional[tuple]) -> tuple:
    """SLEB's greedy list on the job's objective, quietly: EvoPress's first parent (`given`: found before)."""
    if given is not None:
        return tuple(sorted(given))
    greedy_job = dataclasses.replace(job, on_phase=lambda current: None, log=lambda *args, **kwargs: None)
    return tuple(sorted(sleb_iterative(greedy_job, SearchState(depth)).removal_list))


def _children(parent: tuple, candidates: list, evolution: Evolution, rng: random.Random, valid) -> list:
    """`offspring` level-switch mutations of the parent: a removed block swapped with a kept candidate, 1 to
    max_mutations times; a child that breaks a block kind, or is the parent again, is drawn again."""
    children = []
    for _ in range(evolution.offspring):
        for _attempt in range(100):
            child = set(parent)
            for _swap in range(rng.randint(1, evolution.max_mutations)):
                out = rng.choice(sorted(child))
                into = rng.choice([c for c in candidates if c not in child])
                child = (child - {out}) | {into}
            if valid(child) and tuple(sorted(child)) != parent:
                children.append(child)
                break
    return children
