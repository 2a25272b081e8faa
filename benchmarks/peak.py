"""Nominal peak FLOP/s of the hardware a benchmark ran on (the denominator of "MFU
against the hardware's peak").

CPU, float32::

    peak = cores × clock × FLOPs per cycle per core

* ``cores``: the logical CPUs torch computes on, ``min(torch.get_num_threads(), CPUs in
  this process's affinity mask)``; on a VM each vCPU counts as a full core (with SMT two
  vCPUs may share one core's vector units, which would halve the true peak).
* ``clock``: the nominal clock in the CPU's model name ("@ 2.50GHz") when given, else
  the maximum frequency from sysfs, else ``cpu MHz`` from ``/proc/cpuinfo`` (on VMs the
  host's nominal clock). Turbo clocks are not counted.
* ``FLOPs per cycle``: from the vector units the CPU advertises in its ``/proc/cpuinfo``
  flags, assuming two FMA pipes per core (true of Haswell and later Intel cores, Zen 2 and
  later AMD cores; a few parts have one): an FMA is two FLOPs on every lane, so
  AVX-512 + FMA = 2 × 16 × 2 = 64, AVX2 + FMA = 2 × 8 × 2 = 32, AVX without FMA
  (separate add and multiply pipes) = 8 + 8 = 16, SSE only = 4 + 4 = 8.

CUDA: the dense (no sparsity) peak of the dtype the matmuls run in, from the vendor's
datasheet, for the GPUs in :data:`GPU_PEAK_TFLOPS`; None for others.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["GPU_PEAK_TFLOPS", "cpu_peak", "cpu_vector_isa", "gpu_peak", "nominal_peak"]

#: Dense peak TFLOP/s per dtype (fp32 on CUDA cores; tf32/bf16/fp16 on tensor cores),
#: vendor datasheets, matched by substring of ``torch.cuda.get_device_name()`` (first match
#: wins, so the more specific names come first).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10G": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "V100": {"fp32": 15.7, "fp16": 125.0},
    "T4": {"fp32": 8.1, "fp16": 65.0},
}

#: FLOPs per cycle per core in float32 by vector extension (see the module docstring).
_FLOPS_PER_CYCLE = {"avx512": 64, "avx2+fma": 32, "avx": 16, "sse": 8}


def cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def cpu_vector_isa(flags: set[str] | None = None) -> str:
    """The widest float32 vector extension the CPU advertises: ``avx512``, ``avx2+fma``,
    ``avx`` or ``sse``."""
    if flags is None:
        flags = set(cpuinfo().get("flags", "").split())
    if "avx512f" in flags and "fma" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2+fma"
    if "avx" in flags:
        return "avx"
    return "sse"


def _clock_ghz(info: dict[str, str]) -> tuple[float | None, str]:
    m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if m:
        return float(m.group(1)), "model name"
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "sysfs cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu mhz"]) / 1000.0, "cpu MHz"
    except (KeyError, ValueError):
        return None, "unknown"


def cpu_peak(threads: int | None = None) -> dict[str, Any]:
    """Nominal float32 peak of this CPU for ``threads`` compute threads (default: torch's),
    with every term of the formula, or ``gflops: None`` when the clock is unknown."""
    import torch

    info = cpuinfo()
    isa = cpu_vector_isa(set(info.get("flags", "").split()))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    threads = threads or torch.get_num_threads()
    cores = min(threads, affinity or threads)
    ghz, clock_from = _clock_ghz(info)
    per_cycle = _FLOPS_PER_CYCLE[isa]
    gflops = cores * ghz * per_cycle if ghz else None
    return {
        "device": "cpu",
        "dtype": "fp32",
        "gflops": gflops,
        "cores": cores,
        "clock_ghz": ghz,
        "clock_from": clock_from,
        "isa": isa,
        "flops_per_cycle": per_cycle,
        "formula": f"{cores} cores x {ghz} GHz x {per_cycle} FLOPs/cycle ({isa}, 2 FMA pipes)",
    }


def gpu_peak(name: str, dtype: str) -> dict[str, Any]:
    """Dense datasheet peak of the GPU called ``name`` for ``dtype`` (``fp32``, ``tf32``,
    ``bf16``, ``fp16``); ``gflops: None`` for a GPU not in :data:`GPU_PEAK_TFLOPS`."""
    for key, table in GPU_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            tflops = table.get(dtype)
            return {
                "device": "cuda",
                "dtype": dtype,
                "gflops": tflops * 1000.0 if tflops else None,
                "matched": key,
                "formula": f"{key} datasheet dense {dtype} peak: {tflops} TFLOP/s",
            }
    return {
        "device": "cuda",
        "dtype": dtype,
        "gflops": None,
        "matched": None,
        "formula": f"{name!r} is not in the table of known GPUs",
    }


def nominal_peak(device: Any, dtype: str = "fp32") -> dict[str, Any]:
    """:func:`cpu_peak` or :func:`gpu_peak` for a torch device."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return gpu_peak(torch.cuda.get_device_name(0), dtype)
    return cpu_peak()
