"""Candidate-parallel search over torch.distributed (launched with torchrun; NCCL on GPUs, gloo on CPU).

Every rank holds the model and the calibration windows and scores a slice of the phase's candidates;
the losses are gathered, near ties are settled on rank 0 and broadcast, so every rank removes the
same block. Each rank's abandonment uses only its own best loss, which is never below the global
best, so no candidate that could win is abandoned. Only rank 0 writes or prints.
"""

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> tuple:
    """(rank, world size, device) after joining the process group torchrun describes."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        backend = "nccl"
    else:
        device = "cpu"
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if rank != 0:
        os.environ["TQDM_DISABLE"] = "1"
    return rank, world, device


class CandidateParallel:
    """Wraps an engine: this rank scores positions[rank::world]; all ranks get every loss."""

    def __init__(self, engine, rank: int, world: int):
        self.engine = engine
        self.rank = rank
        self.world = world
        self.name = f"{engine.name} x{world} ranks"

    def phase_losses(self, state, positions, previous=None, exhaustive=False, progress=None):
        mine = list(positions)[self.rank :: self.world]
        losses, lower_bounds = self.engine.phase_losses(state, mine, previous=previous, exhaustive=exhaustive,
                                                        progress=progress, settle=False)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (losses, lower_bounds))
        merged, merged_bounds = {}, {}
        for part_losses, part_bounds in gathered:
            merged.update(part_losses)
            merged_bounds.update(part_bounds)
        # A candidate abandoned against its rank's best may be below another rank's best: it still
        # cannot win, since its partial sum already exceeds a complete loss.
        box = [self.engine.settle_ties(state, merged) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0], merged_bounds

    def __getattr__(self, name):  # block_forwards, storage, model, ... of the wrapped engine
        return getattr(self.engine, name)
