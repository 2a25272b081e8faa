"""The per-run report: its sections in order, built from the catalog alone (so
``gptflow report RUN`` rebuilds any run's report); :mod:`flows.report.publish` publishes
it as Prefect artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable

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


def build_markdown(cat: Catalog, run_id: str) -> tuple[str, dict[str, pd.DataFrame]]:
    """The report of ``run_id`` as markdown, and its table artifacts (see
    ``flows.report.publish.TABLES``)."""
    data = ReportData(cat, run_id)
    summary = cat.query_df("SELECT * FROM eval_summary WHERE run_id = ?", [run_id])
    tables = {"spam-accuracy": spam_accuracy(data), "eval-summary": summary}
    return to_markdown(_build(data)), tables
