"""torchrun detection and rank-0 helpers; single-process runs see rank 0 of a world of 1."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect() -> DistInfo:
    """Read the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE); defaults describe a single process."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def is_main_process() -> bool:
    return detect().is_main
