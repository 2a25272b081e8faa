"""The per-run report: its sections in order, built from the catalog alone (so
``gptflow report RUN`` rebuilds any run's report), and published as the Prefect markdown
artifact ``gptflow-report`` (plots inline as PNG data URIs, which the Prefect UI renders)
plus the table artifacts ``spam-accuracy`` and ``eval-summary``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pandas as pd

from flows.report.blocks import Block, Para, Report, text, to_markdown
from flows.report.data import ReportData
from flows.report.evaluation import (
    agreement_section,
    judge_section,
    spam_accuracy,
    spam_section,
    worst_section,
)
from flows.report.overview import (
    checkpoints_section,
    config_section,
    data_section,
    gates_section,
    stages_section,
    summary,
)
from flows.report.training import training_section
from tasks.catalog import Catalog

log = logging.getLogger(__name__)

#: Key of the markdown artifact.
REPORT_KEY = "gptflow-report"

Section = Callable[[ReportData], list[Block]]

#: The report's sections, in order; an empty list leaves a section out.
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


def build_report(cat: Catalog, run_id: str) -> Report:
    """The report of ``run_id``: every section of :data:`SECTIONS` that has something to
    show. A section that fails is replaced by a line saying so (a report never fails)."""
    return _build(ReportData(cat, run_id))


def _build(data: ReportData) -> Report:
    report = Report(title=f"gptflow run {data.run_id}")
    for section in SECTIONS:
        try:
            report.blocks += section(data)
        except Exception as exc:  # one broken section must not hide the others
            log.warning("report section %s failed: %s", section.__name__, exc)
            report.blocks.append(
                Para(text(f"(The {section.__name__} section could not be built: {exc})"))
            )
    return report


def publish_table(key: str, table: pd.DataFrame | list[dict[str, Any]], description: str) -> None:
    """A Prefect table artifact of ``table`` (rows as JSON values; nothing when empty)."""
    from prefect.artifacts import create_table_artifact

    if isinstance(table, pd.DataFrame):
        table = json.loads(table.to_json(orient="records", date_format="iso"))
    if table:
        create_table_artifact(key=key, table=table, description=description)


def publish_report(cat: Catalog, run_id: str) -> str:
    """Create the run's Prefect artifacts; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    data = ReportData(cat, run_id)
    md = to_markdown(_build(data))
    create_markdown_artifact(markdown=md, key=REPORT_KEY, description="gptflow run report")
    publish_table(
        "spam-accuracy",
        spam_accuracy(data),
        "spam accuracy per split: finetuned vs baselines",
    )
    publish_table(
        "eval-summary",
        cat.query_df("SELECT * FROM eval_summary WHERE run_id = ?", [run_id]),
        "judge scores per run x judge x prompt version",
    )
    return md


__all__ = ["REPORT_KEY", "SECTIONS", "build_report", "publish_report", "publish_table"]
