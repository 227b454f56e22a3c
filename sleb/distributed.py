"""Candidate-parallel search over torch.distributed (launched with torchrun; NCCL on GPUs, gloo on CPU).

Every rank holds the model and the calibration windows and scores a slice of the phase's candidates
(or of an evopress stage's sets);
the losses are gathered, and near ties are re-scored across the ranks and gathered too, so every
rank removes the same block. Each rank's abandonment uses only its own best loss, which is never below the global
best, so no candidate that could win is abandoned. Only rank 0 writes or prints.
"""

import os

import torch
import torch.distributed as dist

from sleb.engines import PhaseResult


def join(settings) -> bool:
    """Under torchrun, join the process group it describes (NCCL on GPUs, gloo on CPU) and point
    settings.device at this rank's device. True on the process that claims, prints and writes: rank 0, or
    the only process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        settings.device, backend = f"cuda:{local}", "nccl"
    else:
        settings.device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if rank != 0:
        os.environ["TQDM_DISABLE"] = "1"
    return rank == 0


def rank() -> int:
    """This process's rank in an initialised group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CandidateParallel:
    """An engine over ranks: this rank scores positions[rank::world] with its own engine; every rank
    gets every loss. Re-scores for near ties are split the same way, so each candidate is computed
    once, by one rank, and all ranks see the same numbers."""

    def __init__(self, engine, rank: int, world: int):
        self.engine = engine
        self.rank = rank
        self.world = world
        self.name = f"{engine.name} x{world} ranks"
        self.tie_margin = engine.tie_margin
        if hasattr(engine, "keep"):  # a compensated search folds the chosen map in, on every rank
            self.keep = engine.keep

    def _gather(self, part):
        gathered = [None] * self.world
        dist.all_gather_object(gathered, part)
        return gathered

    def phase(self, removal_list, positions, order_hint=None, complete=False, progress=None, alter=None) -> PhaseResult:
        # A candidate abandoned against its rank's best may be below another rank's best: it still
        # cannot win, since its partial sum already exceeds a complete loss.
        mine = self.engine.phase(removal_list, list(positions)[self.rank :: self.world], order_hint=order_hint,
                                 complete=complete, progress=progress, alter=alter)
        merged = PhaseResult({})
        for part in self._gather(mine):
            merged.losses.update(part.losses)
            merged.lower_bounds.update(part.lower_bounds)
        return merged

    def reference_losses(self, removal_list, positions, alter=None) -> dict:
        mine = self.engine.reference_losses(removal_list, list(positions)[self.rank :: self.world], alter)
        merged = {}
        for part in self._gather(mine):
            merged.update(part)
        return merged

    @property
    def batch_count(self) -> int:
        return self.engine.batch_count

    def set_losses(self, sets: list, batches: list) -> list:
        """Each set's loss over `batches`: this rank scores sets[rank::world]; every rank gets every loss."""
        mine = self.engine.set_losses(list(sets)[self.rank :: self.world], batches)
        merged = [None] * len(sets)
        for rank, part in enumerate(self._gather(mine)):
            merged[rank :: self.world] = part
        return merged

    def stats(self) -> dict:
        return self.engine.stats()  # this rank's (rank 0 writes the results)
