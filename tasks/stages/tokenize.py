"""tokenize: parse and split the three datasets, tokenize and window the pretraining text
(:func:`gpt.recipes.prepare.prepare_datasets`); rows for the dataset tables."""

from __future__ import annotations

import json
from typing import Any

from gpt.recipes.prepare import PrepareArgs, load_instruct_splits, prepare_datasets
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


@stage("tokenize")
def tokenize(run: StageRun, args: PrepareArgs, download: StageOutput) -> TokenizeOut:
    src = download.out.sources
    res = prepare_datasets(
        text_path=download.path(src["the-verdict"].path),
        sms_path=download.path(src["sms-spam"].path),
        instructions_path=download.path(src["instruction-data"].path),
        tokenizer_dir=download.path(src["gpt2-tokenizer"].folder),
        out_dir=run.work,
        args=args,
    )
    producer = run.producer
    sms_sha = src["sms-spam"].sha256[-1]
    messages = json.loads((run.work / res.spam_messages).read_text(encoding="utf-8"))
    run.rows.add("sms_messages", [{**m, "source_sha256": sms_sha} for m in messages])
    spam = json.loads((run.work / res.spam_splits).read_text(encoding="utf-8"))
    run.rows.add(
        "spam_examples",
        [
            {"run_id": producer, "split": s, **{k: r[k] for k in ("idx", "label", "text")}}
            for s, recs in spam.items()
            for r in recs
        ],
    )
    inst = load_instruct_splits(run.work / res.instruct_splits)
    run.rows.add(
        "instructions",
        [
            {
                "run_id": producer,
                "split": s,
                **{k: r[k] for k in ("idx", "instruction", "input", "output")},
            }
            for s, recs in inst.items()
            for r in recs
        ],
    )
    run.rows.add("corpus", [{"run_id": producer, **c} for c in res.corpus])
    return TokenizeOut(
        corpus_text=res.corpus_text,
        train_tokens=res.train_tokens,
        val_tokens=res.val_tokens,
        spam_splits=res.spam_splits,
        spam_messages=res.spam_messages,
        instruct_splits=res.instruct_splits,
        tokenizer=res.tokenizer,
        max_length=args.max_length,
        stride=args.stride,
        corpus=res.corpus,
        spam_counts=res.spam_counts,
        instruct_counts=res.instruct_counts,
        manifests=res.manifests,
    )
