"""The report's training section: per trained stage, its starting and final losses, what
it trained (parameters, tokens or examples, speed, LoRA or full) and its curves; for the
spam classifier, loss and accuracy per epoch."""

from __future__ import annotations

from typing import Any

import pandas as pd

from flows.report import fmt, plots
from flows.report.blocks import Block, Heading, Image, Para, Table, code, text
from flows.report.data import ReportData
from tasks.catalog.rundata import split_key

#: Stages whose training curves the report draws, and their titles.
TRAINED = {
    "pretrain": "pretraining",
    "finetune_spam": "spam classifier finetune",
    "finetune_instruct": "instruction finetune",
}


def _by_split(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return sorted(df.groupby("split"), key=lambda kv: split_key(kv[0]))


def _curves(df: pd.DataFrame, name: str) -> list[plots.Series]:
    return [
        plots.Series(split, g["step"].tolist(), g["value"].tolist())
        for split, g in _by_split(df[df["name"] == name])
    ]


def training_section(d: ReportData) -> list[Block]:
    """Losses of every trained stage, with its facts and curves."""
    blocks: list[Block] = []
    loss_rows = []
    for stage, title in TRAINED.items():
        if d.stage(stage) is None:
            continue
        df = d.curves(stage, ("loss", "step_loss", "accuracy"))
        losses = df[df["name"] == "loss"]
        for split, g in _by_split(losses):
            first, last = g.iloc[0], g.iloc[-1]
            loss_rows.append(
                (
                    stage,
                    split,
                    fmt.loss(first["value"]),
                    fmt.loss(last["value"]),
                    f"steps {fmt.count(first['step'])}–{fmt.count(last['step'])} "
                    f"({len(g)} evaluations)",
                )
            )
        if losses.empty:
            continue
        blocks.append(Heading(title.capitalize(), 3))
        blocks += _stage_facts(d.outputs(stage))
        if stage == "finetune_spam":
            blocks += _spam_training(df)
        else:
            curves = _curves(df, "loss")
            blocks.append(
                Image(
                    lambda c=curves, t=title: plots.line_chart(
                        c, title=f"{t}: loss", xlabel="step", ylabel="cross-entropy"
                    ),
                    f"{title} loss curves",
                )
            )
    if not loss_rows:
        return []
    table = Table(
        ("stage", "split", "starting loss", "final loss", "evaluated"), tuple(loss_rows), "llrrl"
    )
    return [
        Heading("Training"),
        Para(text("Starting loss: the first evaluation; final loss: the last.")),
        table,
        *blocks,
    ]


def _stage_facts(o: dict[str, Any]) -> list[Block]:
    """What a trained stage's outputs say about its training, in one sentence."""
    facts = []
    for key, what in (
        ("parameters", "parameters"),
        ("trainable_params", "trainable parameters"),
        ("tokens_seen", "training tokens"),
        ("examples_seen", "training examples seen"),
    ):
        if o.get(key):
            facts.append(f"{fmt.count(o[key])} {what}")
    if o.get("tokens_per_s"):
        facts.append(f"{fmt.number(o['tokens_per_s'])} tokens/s")
    secs = o.get("train_seconds") or (o.get("timings") or {}).get("train_s")
    if secs:
        facts.append(f"training {fmt.duration(secs)}")
    if o.get("device"):
        facts.append(f"on {o['device']}")
    blocks = [Para(text(", ".join(facts) + "."))] if facts else []
    return blocks + _model_size_facts(o.get("model_size"))


def _model_size_facts(size: dict[str, Any] | None) -> list[Block]:
    """How a finetune trained (LoRA or full), what it stored and on which base."""
    if not size:
        return []
    lora = size.get("lora")
    how = (
        f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on "
        f"{', '.join(lora['layers'])}; the checkpoint holds the adapter only"
        if lora
        else "Full finetune"
    )
    base = size.get("base") or {}
    return [
        Para(
            text(f"{how} ({fmt.size(size.get('checkpoint_bytes'))}); base ")
            + code(str(base.get("name")))
            + text(" (manifest sha256 ")
            + code(str(base.get("sha256"))[:12])
            + text(").")
        )
    ]


def _spam_training(df: pd.DataFrame) -> list[Block]:
    """The spam classifier's per-step loss and per-epoch loss and accuracy."""
    step = df[df["name"] == "step_loss"]
    step_series = (
        plots.Series("train (per step)", step["step"].tolist(), step["value"].tolist())
        if not step.empty
        else None
    )
    loss, accuracy = _curves(df, "loss"), _curves(df, "accuracy")
    epochs = df[df["name"].isin(["loss", "accuracy"])]
    splits = sorted(epochs["split"].unique(), key=split_key)
    rows = []
    for (epoch, stp), g in epochs.groupby(["epoch", "step"]):
        vals = {(r["name"], r["split"]): r["value"] for r in g.to_dict("records")}
        rows.append(
            (
                fmt.count(epoch),
                fmt.count(stp),
                *(fmt.loss(vals.get(("loss", s))) for s in splits),
                *(fmt.percent(vals.get(("accuracy", s))) for s in splits),
            )
        )
    cols = ("epoch", "step", *(f"{s} loss" for s in splits), *(f"{s} accuracy" for s in splits))
    return [
        Image(
            lambda: plots.spam_training(step_series, loss, accuracy),
            "spam classifier training: loss and accuracy per epoch",
        ),
        Table(cols, tuple(rows), "r" * len(cols)),
    ]


__all__ = ["TRAINED", "training_section"]
