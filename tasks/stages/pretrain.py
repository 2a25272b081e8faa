"""pretrain: a GPT from scratch on the token files the tokenize stage wrote
(:func:`gpt.recipes.pretrain.pretrain`), in one process or under torchrun
(``pretrain.distributed``); resumable after a crash."""

from __future__ import annotations

from typing import Any

from gpt.recipes.pretrain import PretrainArgs, PretrainResult, pretrain
from tasks.cache import StageOutput
from tasks.distributed import relative_to_work, train
from tasks.stages.base import Progress, StageOut, StageRun, finite, measured, stage


class PretrainOut(StageOut):
    """The from-scratch model and how its training went."""

    checkpoint: str
    """Checkpoint folder of the final model (tokenizer files included)."""
    loss_png: str | None
    """Train/validation loss curve."""
    steps: int
    epochs: int
    tokens_seen: int
    tokens_per_s: float = measured()
    train_seconds: float = measured()
    final_train_loss: float | None
    final_val_loss: float | None
    train_windows: int
    val_windows: int
    parameters: int
    resumed_from_step: int | None = measured()
    samples: list[dict[str, Any]]


@stage("pretrain", resumable=True)
def pretrain_stage(run: StageRun, args: PretrainArgs, tokenize: StageOutput) -> PretrainOut:
    tok = tokenize.out
    n_train = next(c["windows"] for c in tok.corpus if c["split"] == "train")
    steps = (n_train // args.batch_size) * args.epochs
    if args.max_steps:
        steps = min(steps, args.max_steps)
    res: PretrainResult = train(
        run,
        pretrain,
        {
            "train_tokens": tokenize.path(tok.train_tokens),
            "val_tokens": tokenize.path(tok.val_tokens),
            "tokenizer_dir": tokenize.path(tok.tokenizer),
            "out_dir": run.work,
            "args": args,
            "max_length": tok.max_length,
            "stride": tok.stride,
            "device": run.device,
            "keep_last": False,  # the resumable state is not needed once the stage commits
            "progress": run.progress,
        },
        args.distributed,
        callbacks={
            "on_metrics": run.metrics_sink(Progress("pretrain-progress", steps)),
            "on_sample": run.sample_sink(),
        },
    )
    checkpoint = relative_to_work(run, res.final_dir)
    run.record_checkpoint(checkpoint)
    return PretrainOut(
        checkpoint=checkpoint,
        loss_png=relative_to_work(run, res.loss_png) if res.loss_png else None,
        steps=res.steps,
        epochs=res.epochs,
        tokens_seen=res.tokens_seen,
        tokens_per_s=res.tokens_per_s,
        train_seconds=res.train_seconds,
        final_train_loss=finite(res.final_train_loss),
        final_val_loss=finite(res.final_val_loss),
        train_windows=res.train_windows,
        val_windows=res.val_windows,
        parameters=res.parameters,
        resumed_from_step=res.resumed_from_step,
        samples=res.samples,
    )
