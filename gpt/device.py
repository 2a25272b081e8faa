"""Which torch device a stage runs on: one setting (``auto|cpu|cuda|mps``, or an explicit
``cuda:N``) resolved in one place."""

from __future__ import annotations

import re
from typing import Annotated

import torch
from pydantic import AfterValidator

from gpt.errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")
#: What a device setting may say (see :func:`check_device_name`).
DEVICE_HELP = "auto, cpu, cuda, cuda:N (N = the GPU's index) or mps"


def check_device_name(name: str) -> str:
    """``name`` if it names a device this project runs on (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``), else ValueError; whether that device exists here is checked
    when it is used (:func:`resolve_device`)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"{name!r} is not a device; use {DEVICE_HELP}")
    return name


#: A device setting: one of :data:`DEVICE_HELP`, checked when the settings are built.
DeviceName = Annotated[str, AfterValidator(check_device_name)]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else Apple MPS if available, else the CPU. An explicit
    device that is not available raises :class:`ConfigError` naming the fix. Under a
    torch.distributed process group, ``cuda`` (and ``auto`` on a CUDA machine) means
    this rank's GPU, ``cuda:LOCAL_RANK``."""
    from gpt.distributed.context import device_for_rank

    try:
        check_device_name(name)
    except ValueError as exc:
        raise ConfigError(f"device {exc}") from None
    if name == "auto":
        if torch.cuda.is_available():
            return device_for_rank(torch.device("cuda"))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s) (cuda:0 … cuda:{torch.cuda.device_count() - 1}); use 'cuda'"
        )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {name!r} requested but MPS is not available; use 'auto'")
    return device_for_rank(dev)
