"""Data parallelism for the evaluation on an existing launcher: ``torchrun`` or ``accelerate launch``.

tokenprune starts no processes. When ``tokenprune eval`` is launched by ``torchrun --nproc_per_node N``
(or ``accelerate launch``), each process reads its rank from the environment they set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), joins a ``torch.distributed``
process group (gloo: it gathers Python objects, on CPU and GPU machines alike), evaluates the
batches whose index is its rank modulo ``N``, and the per-batch results are gathered to every rank
and merged in batch order, so rank 0 prints and writes the table a single process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Shard", "shard_from_environment", "SINGLE"]


@dataclass(frozen=True)
class Shard:
    """This process's place among the evaluation's processes.

    Attributes
    ----------
    rank : int
        0-based rank (``RANK``).
    world_size : int
        Number of processes (``WORLD_SIZE``).
    local_rank : int
        Rank on this machine (``LOCAL_RANK``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world_size - 1} (world size {self.world_size})")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether batch ``index`` is this rank's (``index % world_size == rank``)."""
        return index % self.world_size == self.rank

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` for one process); every rank must call it."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(f"rank {self.rank} of {self.world_size}: no torch.distributed process group; "
                              f"get the shard from shard_from_environment()")
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


    def close(self) -> None:
        """Wait for every rank, then destroy the process group (nothing for one process)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


#: One process, no process group.
SINGLE = Shard()


def shard_from_environment(environ=None) -> Shard:
    """The shard of this process: from ``torchrun``/``accelerate launch`` variables, else :data:`SINGLE`.

    With ``WORLD_SIZE > 1`` a gloo process group is initialised (unless one already is) from
    ``MASTER_ADDR``/``MASTER_PORT``.

    Parameters
    ----------
    environ : mapping, optional
        The environment (default ``os.environ``).

    Returns
    -------
    Shard

    Raises
    ------
    ConfigError
        ``RANK``/``WORLD_SIZE`` that are not integers or out of range, or ``WORLD_SIZE > 1`` without
        ``MASTER_ADDR``/``MASTER_PORT`` (not started by a launcher).
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", 0))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                          f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
    shard = Shard(rank=rank, world_size=world, local_rank=local)
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
                raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch with "
                                  f"torchrun --nproc_per_node {world} (or accelerate launch)")
            dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    return shard
