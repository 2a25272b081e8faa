"""Run and stage status for people (``gptflow runs``, ``gptflow evals``): a compact
per-run stage summary that never hides a skipped or failed stage, and why a run has no
judge scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog.store import Catalog

#: Stage statuses that mean "done" (computed now, or reused).
OK = frozenset({"completed", "cached"})


def stage_rows(cat: Catalog, run_ids: list[str], order: Sequence[str] = ()) -> pd.DataFrame:
    """The ``stages`` rows of ``run_ids`` with their ``seconds``, in the stage ``order``
    given (the pipeline's), others after them by start time."""
    df = cat.query_df(
        "SELECT *, epoch(ended_at) - epoch(started_at) AS seconds FROM stages "
        "WHERE list_contains(?, run_id) ORDER BY started_at, stage",
        [list(run_ids)],
    )
    rank = {s: i for i, s in enumerate(order)}
    df["_o"] = df["stage"].map(lambda s: rank.get(s, len(rank)))
    return df.sort_values(["run_id", "_o"], kind="stable").drop(columns="_o")


def stages_summary(stages: pd.DataFrame) -> str:
    """``9 ok``, ``8 ok, judge skipped``, ``3 ok, pretrain failed``: every stage that is
    not completed/cached is named with its status."""
    n_ok = int(stages["status"].isin(OK).sum())
    others = [
        f"{r['stage']} {r['status']}" for r in stages.to_dict("records") if r["status"] not in OK
    ]
    return ", ".join([f"{n_ok} ok", *others]) if len(stages) else "no stages"


def why_no_scores(cat: Catalog, run_id: str | None) -> str:
    """Why ``eval_summary`` is empty for ``run_id`` (default: the latest run), with what
    to do."""
    if run_id is None:
        from tasks.catalog.lookup import latest_run

        run_id = latest_run(cat)
        if run_id is None:
            return (
                f"the catalog {cat.location} holds no runs yet: run the pipeline (`gptflow run`) "
                "or score a responses file with `gptflow judge --responses FILE.json`"
            )
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
    msg = row["message"] if isinstance(row["message"], str) and row["message"].strip() else None
    if row["status"] in ("skipped", "failed"):
        return f"the judge stage of run {run_id} was {row['status']}: " + (msg or "no reason given")
    return f"the judge stage of run {run_id} is {row['status']} and stored no scores"
