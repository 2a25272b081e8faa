"""finetune_spam: the spam classifier on the base model, with frozen-prefix caching
(:func:`gpt.recipes.classifier.finetune_classifier`), in one process or under torchrun
(``finetune_spam.distributed``)."""

from __future__ import annotations

from typing import Any

from gpt.recipes.classifier import SpamArgs, finetune_classifier
from gpt.recipes.prepare import load_spam_splits
from tasks.cache import StageOutput
from tasks.distributed import relative_to_work, train
from tasks.stages.base import StageOut, StageRun, measured, stage


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
    splits = load_spam_splits(tokenize.path(tokenize.out.spam_splits))
    res: dict[str, Any] = train(
        run,
        finetune_classifier,
        {
            "base_checkpoint_dir": load_gpt2.path(load_gpt2.out.spam_base),
            "splits": splits,
            "args": args,
            "out_dir": run.work / "classifier",
            "tokenizer_dir": tokenize.path(tokenize.out.tokenizer),
            "device": run.device,
            "progress": run.progress,
        },
        args.distributed,
        callbacks={"on_metrics": run.metrics_sink()},
    )
    run.rows.add(  # per-example predictions: rows for the catalog, not the result
        "predictions",
        [
            {"run_id": run.producer, "stage": run.stage, "model": "finetuned", **r}
            for r in res.pop("predictions")
        ],
    )
    folder = relative_to_work(run, res["checkpoint"])
    run.record_checkpoint(folder)
    return SpamOut(
        classifier=folder,
        max_length=res["max_length"],
        n_frozen_blocks=res["n_frozen_blocks"],
        trainable_params=res["trainable_params"],
        steps=res["steps"],
        examples_seen=res["examples_seen"],
        final=res["final"],
        timings=res["timings"],
        model_size=res["model_size"],
    )
