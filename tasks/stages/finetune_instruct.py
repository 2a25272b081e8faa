"""finetune_instruct: instruction finetuning on the Alpaca-formatted train split
(:func:`gpt.recipes.instruct.finetune_instruct`, under torchrun when
``finetune_instruct.distributed`` asks); resumable after a crash."""

from __future__ import annotations

from typing import Any

from gpt.recipes.instruct import InstructArgs, finetune_instruct
from gpt.recipes.prepare import load_instruct_splits
from tasks.stages.contract import StageOut, StageOutput, StageRun, measured
from tasks.stages.runner import stage


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
    res = finetune_instruct(
        load_gpt2.path(load_gpt2.out.instruct_base),
        splits["train"],
        splits["val"],
        args,
        out_dir=run.work / "instruct",
        device=run.device,
        on_metrics=run.metrics_sink(),
        on_sample=run.sample_sink(),
        on_progress=run.progress_sink(),
        progress=run.progress,
    )
    return InstructOut.from_result(res, checkpoint=run.checkpoint(res["checkpoint"]))
