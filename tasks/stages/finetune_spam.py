"""finetune_spam: the spam classifier on the base model, with frozen-prefix caching
(:func:`gpt.recipes.classifier.finetune_classifier`, under torchrun when
``finetune_spam.distributed`` asks)."""

from __future__ import annotations

from typing import Any

from gpt.args import SpamArgs
from gpt.eval.baseline import load_spam_splits
from tasks.stages.contract import StageOut, StageOutput, StageRun, measured
from tasks.stages.runner import stage


class SpamOut(StageOut):
    """The classifier checkpoint and its final metrics per split."""

    classifier: str
    """Checkpoint folder of the classifier."""
    max_length: int
    n_frozen_blocks: int
    trainable_params: int
    steps: int
    examples_seen: int
    final: dict[str, dict[str, float | int]]
    """Per split: accuracy, precision, recall, F1 and the confusion matrix."""
    timings: dict[str, float] = measured()
    model_size: dict[str, Any] | None = None
    """Trainable parameters, checkpoint bytes, the base (path, sha256) and the LoRA
    settings (None: full finetune) — :class:`gpt.adapter.ModelSize`."""


@stage("finetune_spam")
def finetune_spam(
    run: StageRun, args: SpamArgs, tokenize: StageOutput, load_gpt2: StageOutput
) -> SpamOut:
    from gpt.recipes.classifier import finetune_classifier

    res = finetune_classifier(
        load_gpt2.path(load_gpt2.out.spam_base),
        load_spam_splits(tokenize.path(tokenize.out.spam_splits)),
        args,
        out_dir=run.work / "classifier",
        tokenizer_dir=tokenize.path(tokenize.out.tokenizer),
        device=run.device,
        on_metrics=run.metrics_sink(),
        progress=run.progress,
    )
    # per-example predictions: rows for the catalog, not the result
    run.add_rows("predictions", [{"model": "finetuned", **r} for r in res["predictions"]])
    return SpamOut.from_result(res, classifier=run.checkpoint(res["checkpoint"]))
