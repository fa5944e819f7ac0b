"""Several processes training one run under `torchrun` (DistributedDataParallel): who this process is, the process
group, and the few collectives the run needs.

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `init_distributed` joins
them into one process group (NCCL between GPUs, gloo on CPUs). A single process gets `Dist()` and every collective
below is a no-op, so the same code runs both ways. When one rank fails it exits with its error, torchrun stops the
others, and the job ends with that rank's exit code rather than a hang.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# How long a collective waits for a rank that is busy elsewhere (building a feature cache, writing a checkpoint)
# before the job fails; a rank that dies is noticed by torchrun much sooner.
TIMEOUT_MIN = float(os.environ.get("BIOMASS5HEAD_DIST_TIMEOUT_MIN", "60"))


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: global rank and world size, rank and process count on this machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} of {self.local_world_size}, "
                f"backend {dist.get_backend()})" if self.enabled else "single process")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable value)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values) -> np.ndarray:
        """Elementwise sum over ranks of a vector of numbers (float64)."""
        arr = np.asarray(values, np.float64)
        if not self.enabled:
            return arr
        t = torch.from_numpy(arr.copy())
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().numpy()

    def shard(self, items: list) -> list:
        """This rank's share of `items`: every world_size-th, starting at its rank (no item twice, none left out)."""
        return list(items)[self.rank::self.world_size]


def init_distributed(device_type: str | None) -> Dist:
    """Join torchrun's process group (once per process); `Dist()` outside torchrun. NCCL when the run is on CUDA,
    gloo otherwise; on CUDA each process takes the GPU of its local rank."""
    world = launched_ranks()
    if world <= 1:
        return Dist()
    env = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK") if k in os.environ}
    if len(env) < 2:
        raise RuntimeError("WORLD_SIZE > 1 without RANK and LOCAL_RANK: start several processes with torchrun")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = device_type in (None, "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=TIMEOUT_MIN))
    info = Dist(env["RANK"], world, env["LOCAL_RANK"], local_world)
    logger.info("distributed: %s", info.describe())
    return info


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
