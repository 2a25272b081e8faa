"""The ``distributed`` settings of a training recipe (one declaration: the pipeline's
stage sections hold it, :func:`gpt.distributed.launch.launchable` reads it)."""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, model_validator

from gpt.config import Args, FieldError

__all__ = ["Backend", "DistributedArgs", "Strategy"]

Backend = Literal["auto", "gloo", "nccl"]
Strategy = Literal["ddp", "fsdp"]

_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class DistributedArgs(Args):
    """How a training stage runs across processes with torch.distributed.

    ``nproc = 1`` and ``nnodes = 1`` (the default) run the training in the calling
    process. Otherwise the training recipe runs under ``torchrun`` in
    ``nproc × nnodes`` processes: the global batch (``batch_size``) is split across them,
    gradients are averaged (DDP, or FSDP with ``strategy = "fsdp"``), and rank 0 alone
    writes checkpoints, metrics and samples.
    """

    nproc: int = Field(1, ge=1)
    """Processes (ranks) on this machine. On CUDA: one per GPU (rank ``i`` uses
    ``cuda:i``); on the CPU each process gets ``OMP_NUM_THREADS`` threads (torchrun's
    default is 1 when that variable is unset)."""
    nnodes: int = Field(1, ge=1)
    """Machines taking part. Each runs the same stage with the same settings (only
    ``node_rank`` may differ); ``rdzv_endpoint`` must then be set and the output folder
    must be on storage every machine sees."""
    node_rank: int | None = Field(None, ge=0)
    """This machine's place (0 … nnodes-1; node 0 holds global rank 0) for a fixed
    layout with a static rendezvous at ``rdzv_endpoint``; None = the c10d rendezvous
    assigns node ranks as machines join."""
    backend: Backend = "auto"
    """Collective backend: ``auto`` = gloo on the CPU, nccl on CUDA; ``gloo``; ``nccl``
    (CUDA builds of torch only)."""
    rdzv_endpoint: str | None = None
    """``host:port`` every machine can reach, where the rendezvous (c10d store) runs:
    on the machine whose address it names. None = a free port on this machine (single
    machine only)."""
    rdzv_id: str = Field("gptflow", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the rendezvous (the same on every machine of one job; different jobs
    sharing an endpoint need different ids)."""
    strategy: Strategy = "ddp"
    """``ddp``: every rank holds the whole model and optimizer state, gradients are
    all-reduced; ``fsdp``: parameters, gradients and optimizer state are sharded across
    ranks (FSDP2 ``fully_shard``), for models whose training state does not fit one
    device. Language-model training (pretrain, finetune_instruct) only; the spam
    classifier trains a small suffix and supports ``ddp`` only."""

    @property
    def world_size(self) -> int:
        """Processes in total (``nproc × nnodes``)."""
        return self.nproc * self.nnodes

    @property
    def is_distributed(self) -> bool:
        """Whether the stage runs under torchrun (more than one process)."""
        return self.world_size > 1

    def check_batch(self, batch_size: int, what: str) -> None:
        """ValueError unless the global batch ``batch_size`` (the setting named ``what``)
        splits evenly over the processes: checked with the settings, before any process
        starts."""
        if batch_size % self.world_size:
            raise ValueError(
                f"{what}={batch_size} cannot be split evenly over distributed.nproc × "
                f"distributed.nnodes = {self.world_size} processes; use a batch_size "
                f"divisible by {self.world_size} or change distributed.nproc"
            )

    @model_validator(mode="after")
    def _layout(self) -> Self:
        if self.rdzv_endpoint is not None and not _ENDPOINT.match(self.rdzv_endpoint):
            raise FieldError(
                "rdzv_endpoint", f"{self.rdzv_endpoint!r} is not host:port (e.g. 10.0.0.5:29400)"
            )
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise FieldError(
                "rdzv_endpoint",
                f"nnodes={self.nnodes} needs rdzv_endpoint (host:port of node 0 that every "
                "machine can reach)",
            )
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise FieldError("node_rank", f"{self.node_rank} must be below nnodes {self.nnodes}")
        return self
