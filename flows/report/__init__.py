"""The per-run report: built from the catalog alone, published as the Prefect markdown
artifact ``gptflow-report`` (plots inline as PNG data URIs, which the Prefect UI renders)
plus the table artifacts ``spam-accuracy`` and ``eval-summary``, and written as one
self-contained HTML file by ``gptflow report RUN --html FILE``."""

from __future__ import annotations

import json
import logging

import pandas as pd

from flows.report.blocks import Report, to_html, to_markdown
from flows.report.sections import SECTIONS, RunData, spam_accuracy
from tasks.catalog import Catalog

log = logging.getLogger(__name__)

#: Key of the markdown artifact.
REPORT_KEY = "gptflow-report"


def build_report(cat: Catalog, run_id: str) -> Report:
    """The report of ``run_id``: every section of :data:`SECTIONS` that has something to
    show. A section that fails is replaced by a line saying so (a report never fails)."""
    from flows.report.blocks import Para, text

    data = RunData.load(cat, run_id)
    report = Report(title=f"gptflow run {run_id}")
    for section in SECTIONS:
        try:
            report.blocks += section(data)
        except Exception as exc:  # one broken section must not hide the others
            log.warning("report section %s failed: %s", section.__name__, exc)
            report.blocks.append(
                Para(text(f"(The {section.__name__} section could not be built: {exc})"))
            )
    return report


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", date_format="iso"))


def publish_report(cat: Catalog, run_id: str) -> str:
    """Create the run's Prefect artifacts; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report = build_report(cat, run_id)
    md = to_markdown(report)
    create_markdown_artifact(markdown=md, key=REPORT_KEY, description="gptflow run report")
    data = RunData.load(cat, run_id)
    spam = spam_accuracy(data)
    if not spam.empty:
        create_table_artifact(
            table=_records(spam),
            key="spam-accuracy",
            description="spam accuracy per split: finetuned vs baselines",
        )
    summary = cat.query_df("SELECT * FROM eval_summary WHERE run_id = ?", [run_id])
    if not summary.empty:
        create_table_artifact(
            table=_records(summary),
            key="eval-summary",
            description="judge scores per run x judge x prompt version",
        )
    return md


__all__ = ["REPORT_KEY", "build_report", "publish_report", "to_html", "to_markdown"]
