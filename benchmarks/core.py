"""What every benchmark shares: the result row, the interleaved timing method and its
statistics, the device set-up and a description of the machine.

The method, for every row (stated in each row's ``method``): warm-up calls of each side
first (untimed), then rounds that run both sides, alternating the order (A, B / B, A ...)
so drift and background load hit both alike, several repeats, and the median reported
with min and max. Ratios are "times better": optimized / baseline for throughputs
(tokens/s, examples/s), baseline / optimized for wall times and memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt.errors import GPTFlowError

__all__ = [
    "BenchResult",
    "BenchSkipped",
    "Timings",
    "completed_run",
    "fresh_folders",
    "gptflow",
    "hardware",
    "interleaved",
    "method_text",
    "pick_device",
    "spread",
]


class BenchSkipped(GPTFlowError):
    """A benchmark cannot run here (missing input); the message says what to provide."""


@dataclass
class BenchResult:
    """One benchmark row."""

    name: str
    """Benchmark name (``train_step``, ``generate``, ...)."""
    baseline: float
    """The baseline side's figure (median of the repeats), in :attr:`unit`."""
    optimized: float
    """The optimized side's figure (median of the repeats), in :attr:`unit`."""
    ratio: float
    """How many times better the optimized side is (see the module docstring)."""
    unit: str
    """Unit of ``baseline`` / ``optimized``."""
    details: dict[str, Any] = field(default_factory=dict)
    """Everything else measured: sizes, raw timings, secondary figures."""
    target: str = ""
    """The target, in words."""
    met: bool | None = None
    """Whether the target was met (None: no target / not applicable)."""
    workload: str = ""
    """What was run, in words (model, sizes)."""
    baseline_label: str = ""
    """What the baseline side is."""
    optimized_label: str = ""
    """What the optimized side is."""
    method: str = ""
    """How it was measured: warm-up, interleaving, repeats (see :func:`method_text`)."""
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per side: ``{min, median, max, n}`` of the figure over the repeats."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- device


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_device(device: torch.device) -> None:
    """TF32 matmuls on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sync(device: torch.device) -> None:
    """Wait for queued device work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (never on CPU: CPUs without bf16 units are ~100x slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: The /proc/cpuinfo flags the results JSON records: the vector and matrix units.
_VECTOR_FLAGS = ("sse", "ssse", "avx", "fma", "f16c", "amx")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _clock_source() -> str | None:
    """The kernel's clock source (``tsc``, ``kvm-clock``, …): what ``perf_counter`` reads."""
    path = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def hardware() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, its vector flags, cores, vector ISA
    and nominal peak, the clock source, torch, threads, device (and GPU name), and the
    glibc malloc tunables in force."""
    from benchmarks.peak import cpu_peak, cpuinfo

    device = pick_device()
    peak = cpu_peak()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_isa": peak["isa"],
        "cpu_flags": sorted(
            f for f in cpuinfo().get("flags", "").split() if f.startswith(_VECTOR_FLAGS)
        ),
        "cpu_clock_ghz": peak["clock_ghz"],
        "clock_source": _clock_source(),
        "cpu_peak_gflops_fp32": peak["gflops"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    if device.type == "cuda":
        info["cuda_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


# --------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Wall seconds of each side's timed calls, plus how they were taken."""

    seconds: dict[str, list[float]]
    """Per side, one entry per timed call, in call order."""
    warmup: dict[str, int]
    """Untimed calls per side before the timed rounds."""
    repeats: dict[str, int]
    """Timed calls per side."""

    def median(self, side: str) -> float:
        """Median seconds of ``side``."""
        return float(statistics.median(self.seconds[side]))

    def rates(self, amount: float) -> tuple[dict[str, list[float]], float, float]:
        """``amount`` of work (tokens, examples) per second: every call's rate per side,
        then the baseline's and the optimized side's rate at their median time."""
        per_call = {k: [amount / s for s in v] for k, v in self.seconds.items()}
        return per_call, amount / self.median("baseline"), amount / self.median("optimized")


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(
    sides: dict[str, Callable[[], Any]],
    *,
    repeats: int | dict[str, int],
    warmup: int | dict[str, int] = 1,
    device: torch.device,
) -> Timings:
    """Run the sides interleaved: warm-up calls first, then rounds alternating the order
    (A,B / B,A / ...). ``repeats``/``warmup`` may differ per side (a side runs in the
    rounds it has left)."""
    names = list(sides)
    reps = repeats if isinstance(repeats, dict) else dict.fromkeys(names, repeats)
    warm = warmup if isinstance(warmup, dict) else dict.fromkeys(names, warmup)
    for r in range(max(warm.values(), default=0)):
        for k in names if r % 2 == 0 else names[::-1]:
            if r < warm.get(k, 0):
                sides[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(max(reps.values())):
        for k in names if r % 2 == 0 else names[::-1]:
            if len(times[k]) < reps[k]:
                times[k].append(timed(sides[k], device))
    return Timings(times, {k: warm.get(k, 0) for k in names}, reps)


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{min, median, max, n}`` of ``values``."""
    return {
        "min": float(min(values)),
        "median": float(statistics.median(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def method_text(t: Timings, extra: str = "", *, warmup: str | None = None) -> str:
    """One line stating how a row was measured (``warmup`` describes a warm-up done
    outside :func:`interleaved`)."""
    warm = max(t.warmup.values(), default=0)
    reps = sorted(set(t.repeats.values()))
    if warmup is None:
        warmup = f"{warm} untimed warm-up call(s) per side" if warm else "no warm-up call"
    text = (
        f"{warmup}, then {'/'.join(map(str, reps))} timed repeat(s) per side, sides "
        "interleaved in alternating order; median reported, min/max kept"
    )
    return f"{text}; {extra}" if extra else text


# --------------------------------------------------------------------------- models


def seeded_model(cfg: Any, device: torch.device, seed: int = 123) -> nn.Module:
    """A gptflow GPT with seeded initial weights."""
    from gpt.model import GPT

    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def linear_params(model: nn.Module) -> int:
    """Weights that take part in matmuls (every Linear, the tied head once)."""
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def train_flops_per_token(model: nn.Module, n_layers: int, emb_dim: int, seq: int) -> int:
    """Model FLOPs of one training token, ``6·N + 12·L·D·T``: ``N`` the weights that take
    part in matmuls (:func:`linear_params`: every Linear, the LM head once even when tied;
    not the embedding tables, which are looked up; not biases or LayerNorms), 2 FLOPs per
    weight forward and 4 backward; plus the attention's two batched matmuls (scores
    q·kᵀ and the weighted sum of v, 2·D·T FLOPs each per token and layer forward, ×3 with
    backward), counted over all T keys as the kernels compute them (the causal half is
    masked, not skipped) — PaLM's convention. Element-wise work (LayerNorm, GELU,
    softmax, dropout, the loss, AdamW) is not counted."""
    return 6 * linear_params(model) + 12 * n_layers * emb_dim * seq


# --------------------------------------------------------------------------- gptflow runs


def gptflow(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600.0) -> str:
    """``gptflow ARGS`` in a new process (the command line, as a user runs it; the
    benchmarks import nothing of ``flows``); returns its stdout. A failure raises
    RuntimeError with the end of its output."""
    from gpt.paths import project_root

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project_root()), env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", "flows.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`gptflow {' '.join(args)}` failed (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-1500:]}"
        )
    return proc.stdout


def completed_run(out: str) -> str:
    """The id of the completed run that ``gptflow run``'s output names."""
    m = re.search(r"^run (\S+): completed", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no completed run in the `gptflow run` output: {out[-1500:]!r}")
    return m.group(1)


@contextlib.contextmanager
def fresh_folders(prefix: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A temporary folder and the environment of a ``gptflow`` process whose artifacts,
    datasets and catalog (``catalog.duckdb``) are in it. The local Prefect server is
    started first (``gptflow server start``), so no timed run pays for it."""
    gptflow(["server", "start"], timeout=300.0)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(tmp)
        yield (
            folder,
            {
                **os.environ,
                "GPTFLOW_ARTIFACTS": str(folder / "artifacts"),
                "GPTFLOW_DATASETS": str(folder / "datasets"),
                "GPTFLOW_DB": str(folder / "catalog.duckdb"),
            },
        )
