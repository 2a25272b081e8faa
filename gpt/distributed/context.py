"""Where this process stands in a torch.distributed job, and the few collectives the
training loops use.

Every helper works without a process group too (then the world is one process of
rank 0 and the collectives do nothing), so the loops call them unconditionally. A job
started by :func:`gpt.distributed.run_distributed` initialises the group through
:func:`init_from_env`; a script run under its own ``torchrun`` may call it as well.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from gpt.errors import ConfigError

__all__ = [
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "device_for_rank",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "main_first",
    "rank",
    "require_divisible",
    "resolve_backend",
    "shard",
    "shutdown",
    "strategy",
    "world_size",
]

log = logging.getLogger(__name__)

_STRATEGY = "ddp"


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process is global rank 0 (the one that writes files and rows)."""
    return rank() == 0


def strategy() -> str:
    """The data-parallel strategy of this job: ``ddp`` or ``fsdp``."""
    return _STRATEGY if is_distributed() else "ddp"


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. repairs a folder), then the other ranks."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def resolve_backend(backend: str, device: str | torch.device = "auto") -> str:
    """``auto`` → nccl when the stage's device is CUDA, else gloo. Raises ConfigError for
    a backend this torch build lacks."""
    if backend == "auto":
        dev = str(device)
        cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
    available = {
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available(),
    }
    if backend not in available:
        raise ConfigError(f"distributed.backend {backend!r} is not one of auto, gloo, nccl")
    if not available[backend]:
        have = [k for k, v in available.items() if v] or ["none"]
        raise ConfigError(
            f"distributed.backend {backend!r} is not available in this torch build "
            f"({torch.__version__}; available: {', '.join(have)}); use backend 'auto' or 'gloo'"
        )
    return backend


def init_from_env(backend: str, strategy: str = "ddp", device: str = "auto") -> None:
    """Join the process group described by torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and record the strategy."""
    global _STRATEGY
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed.strategy {strategy!r} is not one of ddp, fsdp")
    name = resolve_backend(backend, device)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(name, timeout=datetime.timedelta(minutes=30))
    _STRATEGY = strategy


def shutdown() -> None:
    """Leave the process group (if any)."""
    global _STRATEGY
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STRATEGY = "ddp"


def device_for_rank(device: torch.device) -> torch.device:
    """Under a process group, an unindexed ``cuda`` device means this rank's GPU
    (``cuda:LOCAL_RANK``); anything else is returned unchanged."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def require_divisible(batch_size: int, what: str) -> None:
    """ConfigError unless the global batch splits evenly over the ranks."""
    n = world_size()
    if batch_size % n:
        raise ConfigError(
            f"{what}={batch_size} cannot be split evenly over {n} processes; use a "
            f"batch_size divisible by {n} or change distributed.nproc"
        )


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``t`` along dim 0 (rank order; the first
    ``len % world`` ranks get one row more; may be empty)."""
    n = world_size()
    return t if n == 1 else torch.tensor_split(t, n)[rank()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (returned for convenience)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (row counts may
    differ; the other dimensions and the dtype must agree)."""
    if not is_distributed():
        return t
    n = world_size()
    sizes = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    width = max(counts)
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
