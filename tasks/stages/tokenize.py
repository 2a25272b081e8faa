"""tokenize: parse and split the three datasets, tokenize and window the pretraining text
(:func:`gpt.recipes.prepare.prepare_datasets`); rows for the dataset tables."""

from __future__ import annotations

import json
from typing import Any

from gpt.args import PrepareArgs
from tasks.stages.contract import StageOut, StageOutput, StageRun
from tasks.stages.runner import stage


class TokenizeOut(StageOut):
    """The tokenize stage's files (relative to its folder) and counts."""

    corpus_text: str
    train_tokens: str
    """uint16 token file of the training text."""
    val_tokens: str
    """uint16 token file of the validation text."""
    spam_splits: str
    spam_messages: str
    instruct_splits: str
    tokenizer: str
    """Folder with the GPT-2 tokenizer files (encoder.json, vocab.bpe)."""
    max_length: int
    """Pretraining window length in tokens."""
    stride: int
    """Step between pretraining windows."""
    corpus: list[dict[str, Any]]
    spam_counts: dict[str, int]
    instruct_counts: dict[str, int]
    manifests: dict[str, Any]


def _split_rows(splits: dict[str, list[dict[str, Any]]], keys: tuple[str, ...]) -> list[dict]:
    """One row per record of each split: its ``split`` and the fields ``keys``."""
    return [{"split": s, **{k: r[k] for k in keys}} for s, recs in splits.items() for r in recs]


@stage("tokenize")
def tokenize(run: StageRun, args: PrepareArgs, download: StageOutput) -> TokenizeOut:
    from gpt.recipes.prepare import load_instruct_splits, prepare_datasets

    src = download.out.sources
    res = prepare_datasets(
        text_path=download.path(src["the-verdict"].path),
        sms_path=download.path(src["sms-spam"].path),
        instructions_path=download.path(src["instruction-data"].path),
        tokenizer_dir=download.path(src["gpt2-tokenizer"].folder),
        out_dir=run.work,
        args=args,
    )
    sms_sha = src["sms-spam"].sha256[-1]
    messages = json.loads((run.work / res.spam_messages).read_text(encoding="utf-8"))
    run.add_rows("sms_messages", [{**m, "source_sha256": sms_sha} for m in messages])
    spam = json.loads((run.work / res.spam_splits).read_text(encoding="utf-8"))
    run.add_rows("spam_examples", _split_rows(spam, ("idx", "label", "text")))
    inst = load_instruct_splits(run.work / res.instruct_splits)
    run.add_rows("instructions", _split_rows(inst, ("idx", "instruction", "input", "output")))
    run.add_rows("corpus", res.corpus)
    return TokenizeOut.from_result(res, max_length=args.max_length, stride=args.stride)
