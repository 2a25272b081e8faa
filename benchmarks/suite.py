"""The registry of gptflow's benchmarks, each a same-process A/B comparison (see
:mod:`benchmarks.core` for the method every row states).

Modules: :mod:`benchmarks.lm` (training step with MFU, generation, batched generation,
``torch.compile``), :mod:`benchmarks.decode` (decoding on a trained checkpoint: the
extract stage, batch 1 against the book), :mod:`benchmarks.recipes` (spam finetune, judge, windowing),
:mod:`benchmarks.rerun` (a second ``gptflow run`` vs the first), :mod:`benchmarks.vs_book`
(side by side with the book's own package), :mod:`benchmarks.lora` (LoRA vs the full
finetune: step time, memory, accuracy and loss), :mod:`benchmarks.peak` (nominal hardware
peaks), :mod:`benchmarks.render` (the docs/performance.md tables from a results JSON). No Prefect or
DuckDB in the benchmarks themselves: ``gptflow bench`` stores the rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.core import BenchResult, BenchSkipped, hardware, pick_device
from benchmarks.decode import bench_extract_responses, bench_vs_book_generate_trained
from benchmarks.lm import (
    bench_generate,
    bench_generate_batched,
    bench_generate_compile,
    bench_train_step,
    bench_train_step_compile,
    matmul_gflops,
)
from benchmarks.lora import bench_lora_quality, bench_lora_step
from benchmarks.names import ALL, SUITE, VS_BOOK
from benchmarks.recipes import bench_judge, bench_spam_finetune, bench_windowing
from benchmarks.rerun import bench_pipeline_rerun
from benchmarks.vs_book import (
    bench_vs_book_generate,
    bench_vs_book_generate_int8,
    bench_vs_book_spam_epoch,
    bench_vs_book_train_step,
)
from gpt.errors import GPTFlowError

__all__ = [
    "ALL",
    "BENCHMARKS",
    "SUITE",
    "VS_BOOK",
    "BenchResult",
    "BenchSkipped",
    "Benchmark",
    "hardware",
    "matmul_gflops",
    "pick_device",
    "run_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: ``fn(quick, **inputs)``."""

    fn: Callable[..., BenchResult]
    """The benchmark function."""
    needs_tokenizer: bool = False
    """Takes ``tokenizer_dir`` (the GPT-2 tokenizer files)."""
    needs_mirror: bool = False
    """Takes the inputs' mirror as its first argument (the pipeline run)."""


#: Every benchmark by name, in the order of :data:`benchmarks.names.ALL`.
BENCHMARKS: dict[str, Benchmark] = {
    "train_step": Benchmark(bench_train_step),
    "train_step_compile": Benchmark(bench_train_step_compile),
    "generate": Benchmark(bench_generate),
    "generate_compile": Benchmark(bench_generate_compile),
    "generate_batched": Benchmark(bench_generate_batched),
    "extract_responses": Benchmark(bench_extract_responses, needs_mirror=True),
    "spam_finetune": Benchmark(bench_spam_finetune, needs_tokenizer=True),
    "judge": Benchmark(bench_judge),
    "windowing": Benchmark(bench_windowing, needs_tokenizer=True),
    "pipeline_rerun": Benchmark(bench_pipeline_rerun, needs_mirror=True),
    "lora_step": Benchmark(bench_lora_step),
    "lora_quality": Benchmark(bench_lora_quality, needs_mirror=True),
    "vs_book_train_step": Benchmark(bench_vs_book_train_step),
    "vs_book_generate": Benchmark(bench_vs_book_generate),
    "vs_book_generate_int8": Benchmark(bench_vs_book_generate_int8),
    "vs_book_generate_trained": Benchmark(bench_vs_book_generate_trained, needs_mirror=True),
    "vs_book_spam_epoch": Benchmark(bench_vs_book_spam_epoch, needs_tokenizer=True),
}
if tuple(BENCHMARKS) != ALL:  # pragma: no cover - a registry edit without benchmarks.names
    raise RuntimeError("benchmarks.suite.BENCHMARKS and benchmarks.names.ALL disagree")


@contextlib.contextmanager
def _no_grad_leak() -> Iterator[None]:
    prev = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(prev)


def run_benchmark(
    name: str,
    quick: bool = False,
    *,
    tokenizer_dir: Path | None = None,
    mirror: str | None = None,
) -> BenchResult:
    """Run one registered benchmark by name (``tokenizer_dir`` / ``mirror`` for those
    needing them)."""
    if name not in BENCHMARKS:
        raise GPTFlowError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    b = BENCHMARKS[name]
    with _no_grad_leak():
        if b.needs_mirror:
            return b.fn(mirror, quick)
        if b.needs_tokenizer:
            return b.fn(quick, tokenizer_dir=tokenizer_dir)
        return b.fn(quick)
