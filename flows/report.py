"""The per-run report: a markdown artifact (config, data counts, losses, spam accuracy
finetuned vs baselines, eval summary, worst examples) and table artifacts."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from flows.config import PipelineConfig
from tasks.cache import StageOutput
from tasks.catalog import Catalog


def _md_table(df: pd.DataFrame, max_rows: int = 20) -> str:
    if df.empty:
        return "_(none)_"
    df = df.head(max_rows)
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.4f}")
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", " ")[:120])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _producer(out: StageOutput | None, fallback: str) -> str:
    return out.run_id if out is not None else fallback


def build_report(
    cat: Catalog,
    run_id: str,
    cfg: PipelineConfig,
    outputs: dict[str, StageOutput],
    judged: dict[str, Any],
) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Markdown text plus the spam-accuracy and eval-summary tables of a run."""
    spam_run = _producer(outputs.get("finetune_spam"), run_id)
    base_run = _producer(outputs.get("baseline_spam"), run_id)
    resp_run = judged.get("responses_run_id", run_id)
    stages = cat.query_df(
        "SELECT stage, status, cache_hit, round(epoch(ended_at) - epoch(started_at), 1) AS "
        "seconds, message FROM stages WHERE run_id = ? ORDER BY started_at",
        [run_id],
    )
    losses = cat.query_df(
        "SELECT stage, split, arg_max(value, step) AS final_loss, max(step) AS steps "
        "FROM metrics WHERE name = 'loss' AND run_id IN (?, ?) "
        "AND stage IN ('pretrain', 'finetune_instruct') GROUP BY stage, split ORDER BY 1, 2",
        [
            _producer(outputs.get("pretrain"), run_id),
            _producer(outputs.get("finetune_instruct"), run_id),
        ],
    )
    ft = cat.query_df(
        "SELECT split, value AS finetuned FROM metrics WHERE run_id = ? "
        "AND stage = 'finetune_spam' AND name = 'final_accuracy'",
        [spam_run],
    )
    bl = cat.query_df("SELECT split, model, accuracy FROM baselines WHERE run_id = ?", [base_run])
    spam = ft
    if not bl.empty:
        piv = bl.pivot_table(index="split", columns="model", values="accuracy").reset_index()
        spam = piv if ft.empty else ft.merge(piv, on="split", how="outer")
    summary = cat.query_df("SELECT * FROM eval_summary WHERE run_id = ?", [resp_run])
    worst = cat.query_df(
        "SELECT example_id, instruction, response, score FROM eval_examples "
        "WHERE run_id = ? AND score IS NOT NULL ORDER BY score ASC LIMIT 5",
        [resp_run],
    )
    pre = outputs.get("pretrain")
    plot = pre.path("loss.png") if pre is not None else None
    tok = outputs.get("tokenize")
    counts = pd.DataFrame()
    if tok is not None:
        rows = [
            {
                "data": f"text {c['split']}",
                "count": f"{c['chars']} chars, {c['tokens']} tokens, {c['windows']} windows",
            }
            for c in tok.data.get("corpus", [])
        ]
        for name in ("spam_counts", "instruct_counts"):
            for split, n in tok.data.get(name, {}).items():
                rows.append({"data": f"{name.split('_')[0]} {split}", "count": str(n)})
        counts = pd.DataFrame(rows)
    md = [
        f"# gptflow run `{run_id}`",
        f"Profile **{cfg.profile}**, base model **{cfg.load_gpt2.base_model}**.",
        "## Stages",
        _md_table(stages),
        "## Data",
        _md_table(counts),
        "## Losses",
        _md_table(losses),
        f"Loss curve: `{plot}`" if plot is not None else "",
        "## Spam accuracy: finetuned vs baselines",
        _md_table(spam),
        "## Judge",
        _md_table(summary) if not summary.empty else f"_{judged.get('message', 'no scores')}_",
        "## Worst examples",
        _md_table(worst),
        "## Config",
        "```json\n" + json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n```",
    ]
    return "\n\n".join(x for x in md if x), spam, summary


def publish_report(
    cat: Catalog,
    run_id: str,
    cfg: PipelineConfig,
    outputs: dict[str, StageOutput],
    judged: dict[str, Any],
) -> str:
    """Create the Prefect artifacts of a run; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    md, spam, summary = build_report(cat, run_id, cfg, outputs, judged)
    create_markdown_artifact(markdown=md, key="gptflow-report", description="gptflow run report")
    if not spam.empty:
        create_table_artifact(
            table=json.loads(spam.to_json(orient="records")),
            key="spam-accuracy",
            description="spam accuracy per split: finetuned vs baselines",
        )
    if not summary.empty:
        create_table_artifact(
            table=json.loads(summary.to_json(orient="records", date_format="iso")),
            key="eval-summary",
            description="judge scores per run x judge x prompt version",
        )
    return md
