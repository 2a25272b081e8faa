"""The report's sections, each read from the catalog alone (so ``gptflow report RUN``
rebuilds any run's report, and a cached stage's rows are found under the run that
produced them: ``stages.outputs->>'producer_run_id'``).

A section is a function ``(RunData) -> list[Block]``; an empty list leaves it out.
:data:`SECTIONS` is the order. Sections for tables other parts add (``gates``,
``judge_agreement``) appear only when that table exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pandas as pd

from flows.report import fmt, plots
from flows.report.blocks import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Para,
    Table,
    bold,
    code,
    join,
    text,
    with_code_spans,
)
from tasks.catalog import Catalog

#: Stages whose training curves the report draws, and their titles.
TRAINED = {
    "pretrain": "pretraining",
    "finetune_spam": "spam classifier finetune",
    "finetune_instruct": "instruction finetune",
}
#: Splits in the order tables list them.
SPLIT_ORDER = ("train", "val", "validation", "test")


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


@dataclass
class RunData:
    """What the sections read: the run's row, its stages, and catalog access."""

    cat: Catalog
    run_id: str
    run: dict[str, Any]
    stages: pd.DataFrame
    _relations: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, cat: Catalog, run_id: str) -> RunData:
        from gpt.errors import CatalogError

        runs = cat.query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if runs.empty:
            raise CatalogError(
                f"no run {run_id!r} in the catalog {cat.location} (see `gptflow runs`)"
            )
        from flows.profiles import STAGES

        stages = cat.query_df(
            "SELECT stage, status, cache_hit, started_at, ended_at, outputs, message, "
            "epoch(ended_at) - epoch(started_at) AS seconds "
            "FROM stages WHERE run_id = ? ORDER BY started_at, stage",
            [run_id],
        )
        order = {name: i for i, name in enumerate(STAGES)}  # the pipeline's order
        stages = stages.sort_values(
            "stage", key=lambda col: col.map(lambda n: order.get(n, len(order))), kind="stable"
        ).reset_index(drop=True)
        return cls(cat=cat, run_id=run_id, run=runs.iloc[0].to_dict(), stages=stages)

    @cached_property
    def config(self) -> dict[str, Any]:
        raw = self.run.get("config")
        if isinstance(raw, str):
            return json.loads(raw)
        return raw if isinstance(raw, dict) else {}

    def stage(self, name: str) -> dict[str, Any] | None:
        rows = self.stages[self.stages["stage"] == name]
        return None if rows.empty else rows.iloc[0].to_dict()

    def outputs(self, name: str) -> dict[str, Any]:
        row = self.stage(name)
        raw = row.get("outputs") if row else None
        if isinstance(raw, str):
            return json.loads(raw)
        return raw if isinstance(raw, dict) else {}

    def producer(self, name: str) -> str:
        """The run that computed stage ``name``'s rows (this run unless a cache hit)."""
        return str(self.outputs(name).get("producer_run_id") or self.run_id)

    def has(self, relation: str) -> bool:
        """Whether a table or view exists in the catalog."""
        return relation in self.columns_of_all()

    def columns(self, relation: str) -> set[str]:
        return self.columns_of_all().get(relation, set())

    def columns_of_all(self) -> dict[str, set[str]]:
        if not self._relations:
            df = self.cat.query_df("SELECT table_name, column_name FROM information_schema.columns")
            for t, c in zip(df["table_name"], df["column_name"], strict=True):
                self._relations.setdefault(str(t), set()).add(str(c))
        return self._relations

    def metrics(self, stage: str, names: tuple[str, ...]) -> pd.DataFrame:
        marks = ", ".join("?" for _ in names)
        return self.cat.query_df(
            f"SELECT step, epoch, split, name, value FROM metrics WHERE run_id = ? "
            f"AND stage = ? AND name IN ({marks}) ORDER BY step, split",
            [self.producer(stage), stage, *names],
        )


def _run_ref(run_id: str) -> Any:
    return code(run_id[:8] if len(run_id) > 12 else run_id)


def generic_table(df: pd.DataFrame, *, drop: tuple[str, ...] = ()) -> Table:
    """A catalog frame as a table formatted for people (counts with separators,
    accuracies as %, other numbers with a few digits, times to the second)."""
    cols = [c for c in df.columns if c not in drop]
    align = ""
    for c in cols:
        align += "r" if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool else "l"
    rows = []
    for rec in df[cols].to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            if fmt.is_missing(v):
                cells.append(fmt.MISSING)
            elif isinstance(v, bool):
                cells.append(fmt.yes_no(v))
            elif "accuracy" in c or c in ("precision", "recall", "f1", "kappa"):
                cells.append(fmt.percent(v) if "accuracy" in c else fmt.number(v))
            elif pd.api.types.is_integer_dtype(df[c]) or c.startswith("n_") or c == "n":
                cells.append(fmt.count(v))
            elif isinstance(v, float):
                cells.append(fmt.number(v))
            elif hasattr(v, "to_pydatetime"):
                cells.append(fmt.timestamp(v))
            else:
                cells.append(fmt.shorten(v, 100))
        rows.append(tuple(cells))
    return Table(tuple(c.replace("_", " ") for c in cols), tuple(rows), align)


# --------------------------------------------------------------------------- sections


def summary(d: RunData) -> list[Block]:
    r, cfg = d.run, d.config
    took = None
    if not fmt.is_missing(r.get("ended_at")) and not fmt.is_missing(r.get("started_at")):
        took = (r["ended_at"] - r["started_at"]).total_seconds()
    base = (cfg.get("load_gpt2") or {}).get("base_model")
    items = [
        join("profile ", bold(str(r.get("profile") or fmt.MISSING)))
        + (join(", finetuning base ", bold(str(base))) if base else ()),
        join(
            "status ",
            bold(str(r.get("status") or fmt.MISSING)),
            f", started {fmt.timestamp(r.get('started_at'))}",
            f", took {fmt.duration(took)}" if took is not None else "",
        ),
    ]
    if r.get("git_rev"):
        items.append(join("code ", code(str(r["git_rev"]))))
    mirror = (cfg.get("download") or {}).get("mirror")
    items.append(
        join("inputs from the mirror ", code(str(mirror)))
        if mirror
        else text("inputs from the web")
    )
    return [Bullets(tuple(items))]


def stages_section(d: RunData) -> list[Block]:
    if d.stages.empty:
        return []
    rows, notes = [], []
    for s in d.stages.to_dict("records"):
        status = str(s["status"])
        producer = d.producer(s["stage"])
        if s.get("cache_hit") and producer != d.run_id:
            note = join("reused from run ", _run_ref(producer))
        elif s.get("cache_hit"):
            note = text("nothing new to do")
        elif status in ("skipped", "failed"):
            note = text("see below")
        else:
            note = text("")
        rows.append((s["stage"], status, fmt.duration(s.get("seconds")), note))
        if status in ("skipped", "failed") and not fmt.is_missing(s.get("message")):
            notes.append(
                Para(join(bold(f"{s['stage']} {status}:"), " ", with_code_spans(str(s["message"]))))
            )
    return [
        Heading("Stages"),
        Table(("stage", "status", "time", "note"), tuple(rows), "llrl"),
        *notes,
    ]


def data_section(d: RunData) -> list[Block]:
    out = d.outputs("tokenize")
    rows = []
    for c in sorted(out.get("corpus") or [], key=lambda c: _split_key(c.get("split", ""))):
        rows.append(
            (
                "pretraining text",
                c.get("split", ""),
                f"{fmt.plural(c.get('chars'), 'character')}, "
                f"{fmt.plural(c.get('tokens'), 'token')}, {fmt.plural(c.get('windows'), 'window')}",
            )
        )
    for key, what in (("spam_counts", "spam messages"), ("instruct_counts", "instructions")):
        for split, n in sorted((out.get(key) or {}).items(), key=lambda kv: _split_key(kv[0])):
            rows.append((what, split, fmt.count(n)))
    if not rows:
        return []
    return [Heading("Data"), Table(("data", "split", "size"), tuple(rows))]


def _curves(df: pd.DataFrame, name: str) -> list[plots.Series]:
    sub = df[df["name"] == name]
    return [
        plots.Series(split, g["step"].tolist(), g["value"].tolist())
        for split, g in sorted(sub.groupby("split"), key=lambda kv: _split_key(kv[0]))
    ]


def training_section(d: RunData) -> list[Block]:
    blocks: list[Block] = []
    loss_rows = []
    for stage, title in TRAINED.items():
        if d.stage(stage) is None:
            continue
        df = d.metrics(stage, ("loss", "step_loss", "accuracy"))
        losses = df[df["name"] == "loss"]
        for split, g in sorted(losses.groupby("split"), key=lambda kv: _split_key(kv[0])):
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
        blocks += _stage_facts(d, stage)
        if stage == "finetune_spam":
            blocks += _spam_training(df)
        else:
            png = plots.line_chart(
                _curves(df, "loss"), title=f"{title}: loss", xlabel="step", ylabel="cross-entropy"
            )
            blocks.append(Image(png, f"{title} loss curves"))
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


def _stage_facts(d: RunData, stage: str) -> list[Block]:
    o = d.outputs(stage)
    facts = []
    if o.get("parameters"):
        facts.append(f"{fmt.count(o['parameters'])} parameters")
    if o.get("trainable_params"):
        facts.append(f"{fmt.count(o['trainable_params'])} trainable parameters")
    if o.get("tokens_seen"):
        facts.append(f"{fmt.count(o['tokens_seen'])} training tokens")
    if o.get("examples_seen"):
        facts.append(f"{fmt.count(o['examples_seen'])} training examples seen")
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
    step = df[df["name"] == "step_loss"]
    step_series = (
        plots.Series("train (per step)", step["step"].tolist(), step["value"].tolist())
        if not step.empty
        else None
    )
    png = plots.spam_training(step_series, _curves(df, "loss"), _curves(df, "accuracy"))
    epochs = df[df["name"].isin(["loss", "accuracy"])]
    splits = sorted(epochs["split"].unique(), key=_split_key)
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
        Image(png, "spam classifier training: loss and accuracy per epoch"),
        Table(cols, tuple(rows), "r" * len(cols)),
    ]


def _spam_frames(d: RunData) -> tuple[pd.DataFrame, pd.DataFrame]:
    fin = pd.DataFrame()
    if d.stage("finetune_spam") is not None:
        fin = d.cat.query_df(
            "SELECT split, name, value FROM metrics WHERE run_id = ? AND stage = 'finetune_spam' "
            "AND name LIKE 'final_%'",
            [d.producer("finetune_spam")],
        )
    base = pd.DataFrame()
    if d.stage("baseline_spam") is not None:
        base = d.cat.query_df(
            "SELECT model, split, accuracy, precision, recall, f1, tn, fp, fn, tp "
            "FROM baselines WHERE run_id = ?",
            [d.producer("baseline_spam")],
        )
    return fin, base


def best_baseline(base: pd.DataFrame) -> str | None:
    """The baseline with the highest validation accuracy (chosen on validation, so the
    test comparison stays fair); ties go to the first name."""
    if base.empty:
        return None
    val = base[base["split"].isin(["val", "validation"])]
    pool = val if not val.empty else base
    ranked = pool.sort_values(["accuracy", "model"], ascending=[False, True])
    return str(ranked["model"].iloc[0])


def spam_accuracy(d: RunData) -> pd.DataFrame:
    """Accuracy per split: the finetuned classifier and each baseline, each read from the
    run that computed it (columns ``split``, ``finetuned``, one per baseline model)."""
    fin, base = _spam_frames(d)
    acc: dict[str, dict[str, Any]] = {}
    for r in fin[fin["name"] == "final_accuracy"].to_dict("records") if not fin.empty else []:
        acc.setdefault(r["split"], {})["finetuned"] = r["value"]
    models = sorted(base["model"].unique()) if not base.empty else []
    for r in base.to_dict("records"):
        acc.setdefault(r["split"], {})[r["model"]] = r["accuracy"]
    cols = (["finetuned"] if not fin.empty else []) + models
    rows = [
        {"split": split, **{c: acc[split].get(c) for c in cols}}
        for split in sorted(acc, key=_split_key)
    ]
    return pd.DataFrame(rows, columns=["split", *cols])


def spam_section(d: RunData) -> list[Block]:
    fin, base = _spam_frames(d)
    if fin.empty and base.empty:
        return []
    table = spam_accuracy(d)
    cols = [c for c in table.columns if c != "split"]
    rows = tuple((r["split"], *(fmt.percent(r[c]) for c in cols)) for r in table.to_dict("records"))
    blocks: list[Block] = [
        Heading("Spam classifier: finetuned vs baselines"),
        Table(("split", *cols), rows, "l" + "r" * len(cols)),
    ]
    best = best_baseline(base)
    splits = set(table["split"])
    test = "test" if "test" in splits else (sorted(splits, key=_split_key)[-1] if splits else None)
    matrices: dict[str, dict[str, int]] = {}
    detail = []
    if test and not fin.empty:
        f = {r["name"][6:]: r["value"] for r in fin[fin["split"] == test].to_dict("records")}
        if all(k in f for k in ("tn", "fp", "fn", "tp")):
            matrices["finetuned"] = {k: int(f[k]) for k in ("tn", "fp", "fn", "tp")}
            detail.append(("finetuned", f))
    if test and best is not None:
        b = base[(base["model"] == best) & (base["split"] == test)]
        if not b.empty:
            rec = b.iloc[0].to_dict()
            matrices[f"best baseline: {best}"] = {k: int(rec[k]) for k in ("tn", "fp", "fn", "tp")}
            detail.append((best, rec))
    if best is not None:
        blocks.append(Para(join("Best baseline (highest validation accuracy): ", code(best), ".")))
    if matrices:
        blocks.append(
            Image(
                plots.confusion_matrices(matrices, split=test or ""),
                f"confusion matrices on the {test} split",
                f"Rows: true label; columns: prediction ({test} split).",
            )
        )
        blocks.append(
            Table(
                ("model", "accuracy", "precision", "recall", "F1"),
                tuple(
                    (
                        name,
                        fmt.percent(m.get("accuracy")),
                        fmt.percent(m.get("precision")),
                        fmt.percent(m.get("recall")),
                        fmt.percent(m.get("f1")),
                    )
                    for name, m in detail
                ),
                "lrrrr",
            )
        )
    return blocks


def judge_section(d: RunData) -> list[Block]:
    judge = d.stage("judge")
    if judge is None and d.stage("extract_responses") is None:
        return []
    blocks: list[Block] = [Heading("Judge")]
    ext = d.outputs("extract_responses")
    if ext.get("n"):
        blocks.append(
            Para(
                text(
                    f"{fmt.count(ext['n'])} responses, {fmt.count(ext.get('new_tokens'))} new "
                    f"tokens generated in {fmt.duration(ext.get('generation_s'))}."
                )
            )
        )
    summary_df = d.cat.query_df(
        "SELECT * FROM eval_summary WHERE run_id = ? ORDER BY judge_model, prompt_version",
        [d.run_id],
    )
    if summary_df.empty:
        if judge is None:
            why = text("no judge stage ran for this run.")
        elif not fmt.is_missing(judge.get("message")):
            why = join(
                f"the judge stage was {judge['status']}: ", with_code_spans(judge["message"])
            )
        else:
            why = text(f"the judge stage ended {judge['status']} without scores.")
        blocks.append(Para(join(bold("No scores:"), " ", why)))
        return blocks
    # n_examples is n / repeats: one column fewer keeps the table inside the page
    blocks.append(
        generic_table(summary_df, drop=("run_id", "responses_run_id", "judge_key", "n_examples"))
    )
    scores = d.cat.query_df(
        "SELECT judge_model, score FROM run_judgments WHERE run_id = ? AND score IS NOT NULL",
        [d.run_id],
    )
    if not scores.empty:
        by_model = {str(m): g["score"].tolist() for m, g in scores.groupby("judge_model")}
        blocks.append(Image(plots.score_histogram(by_model), "judge score histogram"))
    return blocks


def agreement_section(d: RunData) -> list[Block]:
    """Agreement between judges (the ``judge_agreement`` view, when the catalog has it)."""
    if not d.has("judge_agreement"):
        return []
    cols = d.columns("judge_agreement")
    if "run_id" in cols:
        df = d.cat.query_df("SELECT * FROM judge_agreement WHERE run_id = ?", [d.run_id])
    else:
        return []
    if df.empty:
        return []
    return [
        Heading("Judge agreement", 3),
        generic_table(df, drop=("run_id", "key_a", "key_b")),
    ]


def worst_section(d: RunData) -> list[Block]:
    df = d.cat.query_df(
        "SELECT example_id, instruction, response, score, judge_model FROM eval_examples "
        "WHERE run_id = ? AND score IS NOT NULL ORDER BY score, example_id LIMIT 5",
        [d.run_id],
    )
    if df.empty:
        return []
    rows = tuple(
        (
            fmt.count(r["example_id"]),
            fmt.shorten(r["instruction"], 90),
            fmt.shorten(r["response"], 90) if not fmt.is_missing(r["response"]) else "(empty)",
            fmt.count(r["score"]),
            str(r["judge_model"]),
        )
        for r in df.to_dict("records")
    )
    return [
        Heading("Lowest-scored responses", 3),
        Table(("example", "instruction", "response", "score", "judge"), rows, "rllrl"),
    ]


def gates_section(d: RunData) -> list[Block]:
    """Regression gates of this run (the ``gates`` table, when the catalog has it)."""
    if not d.has("gates"):
        return []
    from tasks.gates import GATES_QUERY

    df = d.cat.query_df(GATES_QUERY, [d.run_id])
    if df.empty:
        return [Heading("Gates"), Para(text("No gates were evaluated for this run."))]
    rows = []
    for r in df.to_dict("records"):
        passed = r.get("passed")
        verdict = fmt.MISSING if fmt.is_missing(passed) else ("passed" if passed else "FAILED")
        if r.get("verdict") == "not enough data":  # passed, on too few examples
            verdict = "not enough data"
        ref = r.get("compared_to_run")
        scope = r.get("scope")
        gate = str(r.get("gate")) + (f" ({scope})" if not fmt.is_missing(scope) else "")
        rows.append(
            (
                gate,
                join(bold(verdict)) if verdict == "FAILED" else verdict,
                fmt.number(r.get("value")),
                fmt.number(r.get("threshold")),
                _run_ref(str(ref)) if not fmt.is_missing(ref) else fmt.MISSING,
                with_code_spans(str(r["message"])) if not fmt.is_missing(r.get("message")) else "",
            )
        )
    n_failed = sum(1 for r in rows if r[1] not in ("passed", "not enough data", fmt.MISSING))
    thin = sum(1 for r in rows if r[1] == "not enough data")
    head = f"{len(rows) - n_failed} of {len(rows)} gates passed." + (
        f" {thin} of them on too few examples for a verdict (not enough data)." if thin else ""
    )
    return [
        Heading("Gates"),
        Para(text(head)),
        Table(("gate", "result", "value", "threshold", "compared to", "message"), tuple(rows)),
    ]


def checkpoints_section(d: RunData) -> list[Block]:
    rows = []
    for stage in ("pretrain", "load_gpt2", "finetune_spam", "finetune_instruct"):
        if d.stage(stage) is None:
            continue
        df = d.cat.query_df(
            "SELECT path, any_value(bytes) AS bytes, any_value(sha256) AS sha256 "
            "FROM checkpoints WHERE run_id = ? AND stage = ? GROUP BY path ORDER BY path",
            [d.producer(stage), stage],
        )
        for r in df.to_dict("records"):
            sha = r.get("sha256")
            rows.append(
                (
                    stage,
                    code(str(r["path"])),
                    fmt.size(r.get("bytes")),
                    code(str(sha)[:12]) if not fmt.is_missing(sha) else fmt.MISSING,
                )
            )
    if not rows:
        return []
    return [
        Heading("Checkpoints"),
        Para(
            text(
                "Checkpoint folders (safetensors + config + manifest) on the machine that ran "
                "the stages; they are files there, not web links. Load one with "
            )
            + code("gptflow generate --checkpoint FOLDER")
            + text(" or ")
            + code("gptflow classify --checkpoint FOLDER")
            + text(".")
        ),
        Table(("stage", "folder", "size", "sha256"), tuple(rows), "llrl"),
    ]


def config_section(d: RunData) -> list[Block]:
    if not d.config:
        return []
    return [Heading("Config"), Code(json.dumps(d.config, indent=1, sort_keys=False), "json")]


Section = Callable[[RunData], list[Block]]

#: The report's sections, in order.
SECTIONS: list[Section] = [
    summary,
    gates_section,
    stages_section,
    data_section,
    training_section,
    spam_section,
    judge_section,
    agreement_section,
    worst_section,
    checkpoints_section,
    config_section,
]

__all__ = ["SECTIONS", "RunData", "best_baseline", "generic_table", "spam_accuracy"]
