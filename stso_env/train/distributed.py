"""Data-parallel training across processes: torch DDP under ``torchrun``, NCCL on GPUs and gloo on CPU.

The design keeps a distributed run equal to a single process that trains on the same *global*
batch:

* **Data.** Every rank holds the same :class:`~stso_env.train.sampler.WindowSampler` (same seed,
  same state) and draws the same global batch; rank ``r`` trains on rows
  ``r * b .. (r + 1) * b`` of it, ``b = batch_size / world_size``. Sharding is therefore a pure
  function of the step, and a resume at the same world size needs no per-rank sampler state.
* **Gradients.** The model is wrapped in ``DistributedDataParallel``, which averages the
  gradients of every backward pass across ranks; each rank weighs its rows as a share of its own
  rows, so the average is the global-batch mean gradient. Clipping, ZClip, SPAM and the
  optimizer step then see identical gradients on every rank, and the replicas stay identical.
  ARC's shards are per-rank shards averaged across ranks (a different partition of the batch
  than one process uses, so ARC runs are not comparable across world sizes).
* **Statistics.** Per-sequence losses are gathered from all ranks in rank order, so every rank
  reports the global batch's loss, variance and clean loss, and the monitor built on them sees the
  same state vector and fires the same trigger everywhere. Probe, validation and activation passes
  run on the (identical) replica of every rank, so they agree without communication.
* **State.** A checkpoint holds every rank's RNG state (``ranks.rng``, gathered to all ranks) and
  the world size; rank 0 writes it. Loading refuses another world size, and each rank restores
  its own RNG, so a resume at the same world size is bit-exact.

Reference: 2020_Li_PyTorchDistributed (keys in ``assets/related_work.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stso_env.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """The initialised process group's world, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device: str = "auto") -> World:
    """Join the job ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
    a single process when ``WORLD_SIZE`` is unset or 1. NCCL when the device is CUDA, gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if dist.is_initialized():
        return current_world()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= local:
            raise ConfigError(f"device: LOCAL_RANK {local} needs {local + 1} CUDA devices, torch sees "
                              f"{torch.cuda.device_count()}; start fewer processes per node")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current_world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, world: World) -> int:
    """Rows per rank; the global batch must split evenly."""
    if batch_size % world.size:
        raise ConfigError(f"data.batch_size: {batch_size} sequences do not split over {world.size} processes; "
                          f"use a multiple of {world.size} (it is the global batch)")
    return batch_size // world.size


def gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate a per-rank tensor along dim 0 in rank order (every rank gets the whole)."""
    if not world.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, world: World) -> list[Any]:
    """One picklable object per rank, in rank order, on every rank (in-process only; nothing is
    unpickled from a file)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
