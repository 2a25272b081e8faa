"""Run and stage status for people (``gptflow runs``, ``gptflow evals``): a compact
per-run stage summary that never hides a skipped or failed stage, and why a run has no
judge scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog.store import Catalog

#: Stage statuses that mean "done" (computed now, or reused).
OK = frozenset({"completed", "cached"})


def stage_rows(cat: Catalog, run_ids: list[str], order: Sequence[str] = ()) -> pd.DataFrame:
    """The stages of ``run_ids``, in the stage ``order`` given (the pipeline's), others
    after them by start time."""
    import pandas as pd

    if not run_ids:
        return pd.DataFrame(
            columns=["run_id", "stage", "status", "cache_hit", "seconds", "message"]
        )
    marks = ", ".join("?" for _ in run_ids)
    df = cat.query_df(
        "SELECT run_id, stage, status, cache_hit, "
        "epoch(ended_at) - epoch(started_at) AS seconds, message, started_at "
        f"FROM stages WHERE run_id IN ({marks}) ORDER BY started_at",
        run_ids,
    )
    rank = {s: i for i, s in enumerate(order)}
    df["_o"] = df["stage"].map(lambda s: rank.get(s, len(rank)))
    return df.sort_values(["run_id", "_o"], kind="stable").drop(columns=["_o", "started_at"])


def stages_summary(stages: pd.DataFrame) -> str:
    """``9 ok``, ``8 ok, judge skipped``, ``3 ok, pretrain failed``: every stage that is
    not completed/cached is named with its status."""
    n_ok = int(stages["status"].isin(OK).sum())
    others = [
        f"{r['stage']} {r['status']}" for r in stages.to_dict("records") if r["status"] not in OK
    ]
    return ", ".join([f"{n_ok} ok", *others]) if len(stages) else "no stages"


def _message(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def why_no_scores(cat: Catalog, run_id: str | None) -> str:
    """Why ``eval_summary`` is empty for ``run_id`` (default: the latest run), with what
    to do."""
    if run_id is None:
        latest = cat.query_df("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
        if latest.empty:
            return (
                f"the catalog {cat.location} holds no runs yet: run the pipeline (`gptflow run`) "
                "or score a responses file with `gptflow judge --responses FILE.json`"
            )
        run_id = str(latest["run_id"].iloc[0])
    elif cat.query_df("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).empty:
        return f"there is no run {run_id!r} in the catalog {cat.location} (see `gptflow runs`)"
    judge = cat.query_df(
        "SELECT status, message FROM stages WHERE run_id = ? AND stage = 'judge'",
        [run_id],
    )
    if judge.empty:
        return (
            f"run {run_id} has no judge stage (the pipeline stopped before it, or the run "
            "is not a pipeline run): score its responses with `gptflow rerun judge --run "
            f"{run_id}` once the earlier stages are done"
        )
    row = judge.iloc[0].to_dict()
    msg = _message(row["message"])
    if row["status"] in ("skipped", "failed"):
        return f"the judge stage of run {run_id} was {row['status']}: " + (msg or "no reason given")
    return f"the judge stage of run {run_id} is {row['status']} and stored no scores"


__all__ = ["OK", "stage_rows", "stages_summary", "why_no_scores"]
