"""Finding runs and the rows that belong to them.

A cached stage's rows belong to the run that computed them: ``stage_producers`` (a view
over ``stages``) names, per run and stage, the run whose rows to read. A run without a
stage row (e.g. one made by ``gptflow judge --responses FILE --run NAME``) reads its own.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError
from tasks.catalog.values import json_object

if TYPE_CHECKING:
    from tasks.catalog import Catalog

#: Tables a run id may appear in (to recognise runs that have no ``runs`` row).
_RUN_TABLES = ("runs", "stages", "responses", "judgments", "metrics", "predictions", "baselines")


def run_ids_like(cat: Catalog, ref: str) -> list[str]:
    """Run ids equal to ``ref``, else those starting with it, from every table that
    holds run rows."""
    union = " UNION ".join(f"SELECT DISTINCT run_id FROM {t}" for t in _RUN_TABLES)
    df = cat.query_df(
        f"SELECT run_id FROM ({union}) WHERE run_id = ? OR starts_with(run_id, ?) ORDER BY run_id",
        [ref, ref],
    )
    ids = [str(x) for x in df["run_id"]]
    return [ref] if ref in ids else ids


def resolve_run(cat: Catalog, ref: str) -> str:
    """The run id ``ref`` names (the full id or a unique prefix of it): what every command
    that takes a run uses. No such run, or a prefix of several: :class:`CatalogError`
    (the candidates listed)."""
    ids = run_ids_like(cat, ref)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise CatalogError(
            f"no run {ref!r} in the catalog {cat.location}; list the runs with `gptflow runs` "
            "(or `gptflow evals` for runs made by `gptflow judge`)"
        )
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    raise CatalogError(
        f"run id prefix {ref!r} is ambiguous in {cat.location}: it matches {len(ids)} runs "
        f"({shown}); give more of the id"
    )


def latest_run(cat: Catalog) -> str | None:
    """The run started last, or None when the catalog holds no run."""
    df = cat.query_df("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
    return None if df.empty else str(df["run_id"].iloc[0])


def latest_completed_runs(cat: Catalog, n: int = 2) -> list[str]:
    """The ``n`` most recently started completed runs, newest first."""
    df = cat.query_df(
        "SELECT run_id FROM runs WHERE status = 'completed' "
        "ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT ?",
        [n],
    )
    return [str(x) for x in df["run_id"]]


def previous_completed_run(cat: Catalog, run_id: str, *, passed_only: bool = False) -> str | None:
    """The latest completed run of ``run_id``'s profile started before it (with
    ``passed_only``: of those, the latest none of whose gates failed)."""
    gate_filter = (
        "AND NOT EXISTS (SELECT 1 FROM gates g WHERE g.run_id = r.run_id AND g.passed = false)"
        if passed_only
        else ""
    )
    rows = cat.query_rows(
        "SELECT r.run_id FROM runs r, (SELECT profile, started_at FROM runs WHERE run_id = ?) me "
        "WHERE r.status = 'completed' AND r.run_id <> ? "
        "AND r.profile IS NOT DISTINCT FROM me.profile AND r.started_at < me.started_at "
        f"{gate_filter} ORDER BY r.started_at DESC LIMIT 1",
        [run_id, run_id],
    )
    return str(rows[0]["run_id"]) if rows else None


def stage_outcomes(cat: Catalog, run_id: str) -> list[list[Any]]:
    """Per stage of the run, sorted: ``[stage, "done" or its status, why not done, the run
    that produced its results, their key, their digest]`` — what its results are, whichever
    run computed them (two runs with equal outcomes hold the same results)."""
    out = []
    for row in cat.query_rows(
        "SELECT stage, status, outputs, message FROM stages WHERE run_id = ?", [run_id]
    ):
        outputs = json_object(row["outputs"])  # none recorded: skipped
        done = row["status"] in ("completed", "cached")
        out.append(
            [
                row["stage"],
                "done" if done else row["status"],
                None if done else str(row["message"]),
                outputs.get("producer_run_id"),
                outputs.get("key"),
                outputs.get("digest"),
            ]
        )
    return sorted(out, key=lambda r: str(r[0]))


def producers(cat: Catalog, run_id: str) -> dict[str, str]:
    """``{stage: run whose rows the stage's results are}`` for every stage of the run."""
    rows = cat.query_rows(
        "SELECT stage, producer_run_id FROM stage_producers WHERE run_id = ?", [run_id]
    )
    return {str(r["stage"]): str(r["producer_run_id"]) for r in rows}


def run_info(cat: Catalog, run_id: str) -> dict[str, Any]:
    """The ``runs`` row of a run (config parsed) with how many gates were evaluated and
    failed, or only its id when it has no row."""
    df = cat.query_df(
        "SELECT run_id, profile, status, started_at, ended_at, git_rev, config FROM runs "
        "WHERE run_id = ?",
        [run_id],
    )
    if df.empty:
        return {"run_id": run_id, "config": None}
    row = df.iloc[0].to_dict()
    cfg = row.get("config")
    row["config"] = json.loads(cfg) if isinstance(cfg, str) else None
    gates = cat.query_df(
        "SELECT count(*) AS n, count(*) FILTER (WHERE passed = false) AS failed FROM gates "
        "WHERE run_id = ?",
        [run_id],
    )
    row["gates_evaluated"] = int(gates["n"].iloc[0])
    row["gates_failed"] = int(gates["failed"].iloc[0])
    return row
