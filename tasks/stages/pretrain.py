"""pretrain: a GPT from scratch on the token files the tokenize stage wrote
(:func:`gpt.recipes.pretrain.pretrain`, under torchrun when ``pretrain.distributed``
asks); resumable after a crash."""

from __future__ import annotations

from typing import Any

from gpt.recipes.pretrain import PretrainArgs, pretrain
from tasks.stages.contract import StageOut, StageOutput, StageRun, measured
from tasks.stages.runner import stage


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
    res = pretrain(
        tokenize.path(tok.train_tokens),
        tokenize.path(tok.val_tokens),
        tokenize.path(tok.tokenizer),
        run.work,
        args,
        max_length=tok.max_length,
        stride=tok.stride,
        device=run.device,
        keep_last=False,  # the resumable state is not needed once the stage commits
        on_metrics=run.metrics_sink(),
        on_sample=run.sample_sink(),
        on_progress=run.progress_sink(),
        progress=run.progress,
    )
    return PretrainOut.from_result(
        res,
        checkpoint=run.checkpoint(res.final_dir),
        loss_png=run.relative(res.loss_png) if res.loss_png else None,
    )
