"""The per-run report: its sections in order, built from the catalog alone (so
``gptflow report RUN`` rebuilds any run's report), and published as the Prefect markdown
artifact ``gptflow-report`` (plots inline as PNG data URIs, which the Prefect UI renders)
plus the table artifacts ``spam-accuracy`` and ``eval-summary``.

A run whose results are those of an earlier run — every stage served from the cache with
the same outputs, the same gate verdicts, the same settings and the same report code —
gets that run's stored report (under ``artifacts/reports/``) with a line saying so,
instead of a rebuild (reading every section's rows and drawing the plots)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
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

    table = _rows(table)
    if table:
        create_table_artifact(key=key, table=table, description=description)


#: The table artifacts published beside the report: key -> description.
TABLES = {
    "spam-accuracy": "spam accuracy per split: finetuned vs baselines",
    "eval-summary": "judge scores per run x judge x prompt version",
}


def report_inputs_key(cat: Catalog, run_id: str) -> str:
    """What a run's report shows, as a key: per stage the outcome (done or skipped with
    its message), the run that produced its results, their key and digest; the gates'
    verdicts and values; the run's settings; the report's own code. Two runs with one
    key have the same report but for the run id and timings."""
    stages = cat.query_df(
        "SELECT stage, status, outputs, message FROM stages WHERE run_id = ?", [run_id]
    )
    gates = cat.query_df(
        "SELECT gate, scope, passed, verdict, n, value, threshold FROM gates WHERE run_id = ?",
        [run_id],
    )
    config = cat.query_df("SELECT config FROM runs WHERE run_id = ?", [run_id])
    parts: dict[str, Any] = {"stages": [], "gates": [], "config": None, "code": {}}
    for row in stages.to_dict("records"):
        out = row["outputs"]
        out = json.loads(out) if isinstance(out, str) else out
        out = out if isinstance(out, dict) else {}  # none recorded (a skipped stage)
        done = row["status"] in ("completed", "cached")
        parts["stages"].append(
            [
                row["stage"],
                "done" if done else row["status"],
                None if done else str(row["message"]),
                out.get("producer_run_id"),
                out.get("key"),
                out.get("digest"),
            ]
        )
    parts["stages"].sort(key=lambda r: str(r[0]))
    parts["gates"] = sorted(
        json.loads(gates.to_json(orient="values")), key=lambda r: (str(r[0]), str(r[1]))
    )
    parts["config"] = None if config.empty else config["config"].iloc[0]
    for path in sorted(Path(__file__).parent.glob("*.py")):
        parts["code"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _stored_path(key: str) -> Path:
    from gpt.paths import artifacts_dir

    return artifacts_dir() / "reports" / f"{key}.json"


def stored_report(key: str) -> dict[str, Any] | None:
    """The report stored under ``key`` (``run_id``, ``markdown``, ``tables``), if any."""
    try:
        stored = json.loads(_stored_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(stored, dict) and isinstance(stored.get("markdown"), str)
    return stored if ok else None


def _store_report(key: str, stored: dict[str, Any]) -> None:
    from gpt.fileio import atomic_open

    path = _stored_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w", encoding="utf-8") as fh:
            json.dump(stored, fh)
    except OSError as exc:  # the report was published; only a later reuse is lost
        log.warning("could not store the report of run %s at %s: %s", stored["run_id"], path, exc)


def publish_report(cat: Catalog, run_id: str) -> str:
    """Create the run's Prefect artifacts; returns the markdown. A run whose report
    inputs (:func:`report_inputs_key`) match an earlier run's reuses that run's stored
    report, saying so at its top and in the log."""
    from prefect.artifacts import create_markdown_artifact

    key = report_inputs_key(cat, run_id)
    stored = stored_report(key)
    if stored is not None:
        log.info(
            "report: nothing changed since run %s (same results, gate verdicts and "
            "settings); its stored report is reused, not rebuilt",
            stored["run_id"],
        )
        md = (
            f"> Nothing changed since run `{stored['run_id']}`: every stage's results, the "
            "gates' verdicts and the settings are the same, so this is that run's report "
            "(reused, not rebuilt).\n\n" + stored["markdown"]
        )
        tables = stored.get("tables") or {}
    else:
        data = ReportData(cat, run_id)
        md = to_markdown(_build(data))
        tables = {
            "spam-accuracy": _rows(spam_accuracy(data)),
            "eval-summary": _rows(
                cat.query_df("SELECT * FROM eval_summary WHERE run_id = ?", [run_id])
            ),
        }
        _store_report(key, {"run_id": run_id, "markdown": md, "tables": tables})
    create_markdown_artifact(markdown=md, key=REPORT_KEY, description="gptflow run report")
    for name, description in TABLES.items():
        publish_table(name, tables.get(name) or [], description)
    return md


def _rows(table: pd.DataFrame | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A table as JSON rows (what a table artifact holds)."""
    if isinstance(table, pd.DataFrame):
        return json.loads(table.to_json(orient="records", date_format="iso"))
    return table


__all__ = [
    "REPORT_KEY",
    "SECTIONS",
    "TABLES",
    "build_report",
    "publish_report",
    "publish_table",
    "report_inputs_key",
    "stored_report",
]
