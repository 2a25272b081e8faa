"""What the report's sections read: one run's ``runs`` row and stage rows, plus its
evaluation rows read through the runs that produced them
(:class:`tasks.catalog.rundata.RunData`: a cached stage's rows belong to the run that
computed them), and a catalog frame turned into a table for people."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import pandas as pd

from flows.report import fmt
from flows.report.blocks import Inline, Table, code
from gpt.errors import CatalogError
from tasks.catalog import Catalog
from tasks.catalog.rundata import RunData
from tasks.catalog.status import stage_rows
from tasks.catalog.values import json_object
from tasks.stages import STAGES


class ReportData(RunData):
    """One run as the report sees it: :class:`RunData` plus the ``runs`` row (``run``)
    and the stage rows in the pipeline's order (``stages``)."""

    def __init__(self, cat: Catalog, run_id: str) -> None:
        super().__init__(cat, run_id)
        runs = cat.query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if runs.empty:
            raise CatalogError(
                f"no run {run_id!r} in the catalog {cat.location} (see `gptflow runs`)"
            )
        self.run: dict[str, Any] = runs.iloc[0].to_dict()
        self.stages = stage_rows(cat, [run_id], STAGES).reset_index(drop=True)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The run's config (empty when it recorded none)."""
        return json_object(self.run.get("config"))

    def stage(self, name: str) -> dict[str, Any] | None:
        """The stage's row, or None when the run has none."""
        rows = self.stages[self.stages["stage"] == name]
        return None if rows.empty else rows.iloc[0].to_dict()

    def outputs(self, name: str) -> dict[str, Any]:
        """The stage's recorded outputs (empty when none)."""
        row = self.stage(name)
        return json_object(row.get("outputs") if row else None)

    @cached_property
    def relations(self) -> set[str]:
        """The catalog's tables and views."""
        df = self.cat.query_df("SELECT DISTINCT table_name FROM information_schema.columns")
        return {str(t) for t in df["table_name"]}

    def curves(self, stage: str, names: tuple[str, ...]) -> pd.DataFrame:
        """step, epoch, split, name, value of the stage's metrics ``names`` (its producer's)."""
        marks = ", ".join("?" for _ in names)
        return self.cat.query_df(
            f"SELECT step, epoch, split, name, value FROM metrics WHERE run_id = ? "
            f"AND stage = ? AND name IN ({marks}) ORDER BY step, split",
            [self.of(stage), stage, *names],
        )


def run_ref(run_id: str) -> Inline:
    """A run id as code, its first 8 characters when long."""
    return code(run_id[:8] if len(run_id) > 12 else run_id)


def generic_table(df: pd.DataFrame, *, drop: tuple[str, ...] = ()) -> Table:
    """A catalog frame as a table formatted for people (counts with separators,
    accuracies as %, other numbers with a few digits, times to the second)."""
    cols = [c for c in df.columns if c not in drop]
    align = "".join(
        "r" if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool else "l" for c in cols
    )
    rows = []
    for rec in df[cols].to_dict("records"):
        rows.append(tuple(_cell(c, rec[c], df[c]) for c in cols))
    return Table(tuple(c.replace("_", " ") for c in cols), tuple(rows), align)


def _cell(column: str, v: Any, series: pd.Series) -> str:
    if fmt.is_missing(v):
        return fmt.MISSING
    if isinstance(v, bool):
        return fmt.yes_no(v)
    if "accuracy" in column:
        return fmt.percent(v)
    if column in ("precision", "recall", "f1", "kappa"):
        return fmt.number(v)
    if pd.api.types.is_integer_dtype(series) or column.startswith("n_") or column == "n":
        return fmt.count(v)
    if isinstance(v, float):
        return fmt.number(v)
    if hasattr(v, "to_pydatetime"):
        return fmt.timestamp(v)
    return fmt.shorten(v, 100)
