"""Which torch device a stage runs on: one setting (``auto|cpu|cuda|mps``, or an explicit
``cuda:N``) resolved in one place."""

from __future__ import annotations

from typing import Literal

import torch

from gpt.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else Apple MPS if available, else the CPU. An explicit
    device that is not available raises :class:`ConfigError` naming the fix. Under a
    torch.distributed process group, ``cuda`` (and ``auto`` on a CUDA machine) means
    this rank's GPU, ``cuda:LOCAL_RANK``."""
    from gpt.distributed.context import device_for_rank

    if name == "auto":
        if torch.cuda.is_available():
            return device_for_rank(torch.device("cuda"))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {name!r} is not a torch device name ({exc}); use auto, cpu, cuda or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'auto'")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {name!r} requested but MPS is not available; use 'auto'")
    return device_for_rank(dev)
