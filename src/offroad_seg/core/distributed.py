"""torchrun support: the same commands on several processes, GPUs and nodes.

`torchrun --nproc-per-node K [--nnodes N ...] -m offroad_seg extract|train ...` sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous variables; `init()` reads them (no flag needed) and
joins the process group: NCCL on CUDA, gloo on CPU. Without them everything is a world of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (and returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's value of a picklable object, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, requested: torch.device) -> torch.device:
        """Each rank's own GPU on CUDA machines (cuda:LOCAL_RANK)."""
        if requested.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return requested


SINGLE = World()  # a world of one process


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of a rank: `seed` itself on rank 0 (a one-process run is unchanged), a
    seed of its own on every other rank, so that ranks draw different dropout masks (DDP
    copies rank 0's initial weights to every rank, so they start alike anyway)."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"offroad-seg/{seed}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch takes seeds below 2**63


def from_env() -> World:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    return World(
        rank=int(os.environ["RANK"]),
        size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


@contextlib.contextmanager
def launched(device: torch.device) -> Iterator[World]:
    """Join the torchrun process group for the duration of a stage (a no-op when not launched
    by torchrun, or when already joined)."""
    world = from_env()
    if not world.enabled or dist.is_initialized():
        yield world
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    elif world.local_size > 1:
        # ranks sharing a CPU split its cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    log.debug("rank %d of %d joined (%s)", world.rank, world.size, backend)
    try:
        yield world
    finally:
        dist.destroy_process_group()
