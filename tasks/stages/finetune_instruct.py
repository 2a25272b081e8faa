"""finetune_instruct: instruction finetuning on the Alpaca-formatted train split
(:func:`gpt.recipes.instruct.finetune_instruct`), in one process or under torchrun
(``finetune_instruct.distributed``); resumable after a crash."""

from __future__ import annotations

import math
from typing import Any

from gpt.recipes.instruct import InstructArgs, finetune_instruct
from gpt.recipes.prepare import load_instruct_splits
from tasks.cache import StageOutput
from tasks.distributed import relative_to_work, train
from tasks.stages.base import Progress, StageOut, StageRun, finite, measured, stage


class InstructOut(StageOut):
    """The instruction-finetuned model and how its training went."""

    checkpoint: str
    """Checkpoint folder of the finetuned model."""
    steps: int
    tokens_seen: int
    tokens_per_s: float = measured()
    final_train_loss: float | None
    final_val_loss: float | None
    resumed_from_step: int | None = measured()
    max_length: int
    n_train: int
    n_val: int
    samples: list[dict[str, Any]]
    timings: dict[str, float] = measured()
    trainable_params: int | None = None
    model_size: dict[str, Any] | None = None
    """Trainable parameters, checkpoint bytes, the base (path, sha256) and the LoRA
    settings (None: full finetune) — :class:`gpt.adapter.ModelSize`."""


@stage("finetune_instruct", resumable=True)
def finetune_instruct_stage(
    run: StageRun, args: InstructArgs, tokenize: StageOutput, load_gpt2: StageOutput
) -> InstructOut:
    splits = load_instruct_splits(tokenize.path(tokenize.out.instruct_splits))
    steps = math.ceil(len(splits["train"]) / args.batch_size) * args.epochs
    if args.max_steps:
        steps = min(steps, args.max_steps)
    res: dict[str, Any] = train(
        run,
        finetune_instruct,
        {
            "base_checkpoint_dir": load_gpt2.path(load_gpt2.out.instruct_base),
            "train_records": splits["train"],
            "val_records": splits["val"],
            "args": args,
            "out_dir": run.work / "instruct",
            "device": run.device,
            "progress": run.progress,
        },
        args.distributed,
        callbacks={
            "on_metrics": run.metrics_sink(Progress("finetune-instruct-progress", steps)),
            "on_sample": run.sample_sink(),
        },
    )
    folder = relative_to_work(run, res["checkpoint"])
    run.record_checkpoint(folder)
    return InstructOut(
        checkpoint=folder,
        steps=res["steps"],
        tokens_seen=res["tokens_seen"],
        tokens_per_s=res["tokens_per_s"],
        final_train_loss=finite(res["final_train_loss"]),
        final_val_loss=finite(res["final_val_loss"]),
        resumed_from_step=res["resumed_from_step"],
        max_length=res["max_length"],
        n_train=res["n_train"],
        n_val=res["n_val"],
        samples=res["samples"],
        timings=res["timings"],
        trainable_params=res["trainable_params"],
        model_size=res["model_size"],
    )
