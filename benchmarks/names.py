"""Benchmark names, importable without torch (``gptflow --help`` builds its parser from
them); :mod:`benchmarks.suite` maps each to its function and checks the two agree."""

from __future__ import annotations

#: Every benchmark, in the order ``gptflow bench`` runs them.
ALL: tuple[str, ...] = (
    "train_step",
    "train_step_compile",
    "generate",
    "generate_compile",
    "generate_batched",
    "extract_responses",
    "spam_finetune",
    "judge",
    "windowing",
    "pipeline_rerun",
    "lora_step",
    "lora_quality",
    "vs_book_train_step",
    "vs_book_generate",
    "vs_book_generate_int8",
    "vs_book_generate_trained",
    "vs_book_spam_epoch",
)
#: The side-by-side comparisons with the book's package (``gptflow bench --vs-book``).
VS_BOOK: tuple[str, ...] = tuple(n for n in ALL if n.startswith("vs_book_"))
#: What a plain ``gptflow bench`` runs.
SUITE: tuple[str, ...] = tuple(n for n in ALL if n not in VS_BOOK)
