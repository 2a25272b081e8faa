"""Publishing a run's report as Prefect artifacts: the markdown artifact
``gptflow-report`` (plots inline as PNG data URIs, which the Prefect UI renders) and the
table artifacts ``spam-accuracy`` and ``eval-summary``.

A run whose results are those of an earlier run — every stage served from the cache with
the same outputs, the same gate verdicts, the same settings and the same report code —
gets that run's stored report (under ``artifacts/reports/``) with a line saying so,
instead of a rebuild (reading every section's rows and drawing the plots); deciding
that imports neither pandas nor matplotlib."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.store.memo import memo_key, read_memo, write_memo

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog import Catalog

log = logging.getLogger(__name__)

#: Key of the markdown artifact.
REPORT_KEY = "gptflow-report"


def table_rows(table: pd.DataFrame | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A table as JSON rows (what a table artifact holds)."""
    if isinstance(table, list):
        return table
    return json.loads(table.to_json(orient="records", date_format="iso"))


def publish_table(key: str, table: pd.DataFrame | list[dict[str, Any]], description: str) -> None:
    """A Prefect table artifact of ``table`` (rows as JSON values; nothing when empty)."""
    from prefect.artifacts import create_table_artifact

    rows = table_rows(table)
    if rows:
        create_table_artifact(key=key, table=rows, description=description)


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
    from tasks.catalog.lookup import stage_outcomes

    gates = cat.query_rows(
        "SELECT gate, scope, passed, verdict, n, value, threshold FROM gates WHERE run_id = ?",
        [run_id],
    )
    config = cat.query_rows("SELECT config FROM runs WHERE run_id = ?", [run_id])
    return memo_key(
        {
            "stages": stage_outcomes(cat, run_id),
            "gates": sorted(
                (list(g.values()) for g in gates), key=lambda r: (str(r[0]), str(r[1]))
            ),
            "config": config[0]["config"] if config else None,
            "code": {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(__file__).parent.glob("*.py"))
            },
        }
    )


def publish_report(cat: Catalog, run_id: str) -> str:
    """Create the run's Prefect artifacts; returns the markdown. A run whose report
    inputs (:func:`report_inputs_key`) match an earlier run's reuses that run's stored
    report, saying so at its top and in the log."""
    from prefect.artifacts import create_markdown_artifact

    key = report_inputs_key(cat, run_id)
    stored = read_memo("reports", key)  # run_id, markdown, tables
    if stored is not None and isinstance(stored.get("markdown"), str):
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
        from flows.report.build import build_markdown

        md, frames = build_markdown(cat, run_id)
        tables = {name: table_rows(df) for name, df in frames.items()}
        write_memo("reports", key, {"run_id": run_id, "markdown": md, "tables": tables})
    create_markdown_artifact(markdown=md, key=REPORT_KEY, description="gptflow run report")
    for name, description in TABLES.items():
        publish_table(name, tables.get(name) or [], description)
    return md
