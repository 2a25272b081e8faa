"""Rows the tests put into a catalog directly: a run, a stage, a source, a checkpoint,
metrics — as the pipeline's records would hold them, without running it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.catalog import Catalog, checkpoint_digest, utcnow
from tasks.catalog.values import to_json, to_utc_naive


def start_run(
    cat: Catalog,
    run_id: str,
    *,
    flow_run_id: str | None = None,
    profile: str | None = None,
    config: dict[str, Any] | None = None,
    git_rev: str | None = None,
) -> None:
    """A ``running`` run started now (rerunning the id replaces the row)."""
    row = {
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        "profile": profile,
        "config": config,
        "git_rev": git_rev,
        "started_at": utcnow(),
        "ended_at": None,
        "status": "running",
    }
    cat.upsert_rows("runs", [row], key=["run_id"])


def record_stage(
    cat: Catalog,
    run_id: str,
    stage: str,
    *,
    status: str,
    started_at: dt.datetime | None = None,
    ended_at: dt.datetime | None = None,
    cache_hit: bool | None = None,
    outputs: dict[str, Any] | None = None,
    message: str | None = None,
) -> None:
    """Upsert the (run, stage) row, as :meth:`tasks.records.runs.RunRecorder.record`
    does: ``running`` starts now; other statuses end now and keep the start."""
    now = utcnow()
    if status == "running":
        started_at = started_at or now
    else:
        ended_at = ended_at or now

    def body(con: Any) -> None:
        started = started_at
        if started is None:
            prev = con.execute(
                "SELECT started_at FROM stages WHERE run_id = ? AND stage = ?", [run_id, stage]
            ).fetchone()
            started = prev[0] if prev else None
        con.execute("DELETE FROM stages WHERE run_id = ? AND stage = ?", [run_id, stage])
        con.execute(
            "INSERT INTO stages (run_id, stage, status, started_at, ended_at, cache_hit, "
            "outputs, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                stage,
                status,
                to_utc_naive(started),
                to_utc_naive(ended_at),
                cache_hit,
                to_json(outputs),
                message,
            ],
        )

    cat.write("stages", body)


def record_source(cat: Catalog, name: str, url: str, sha256: str, bytes: int) -> None:
    """Upsert a downloaded source by ``name`` (``fetched_at`` now)."""
    row = {"name": name, "url": url, "sha256": sha256, "bytes": int(bytes), "fetched_at": utcnow()}
    cat.upsert_rows("sources", [row], key=["name"])


def record_checkpoint(
    cat: Catalog, run_id: str, stage: str, path: str | Path, *, config: dict | None = None
) -> None:
    """Upsert a checkpoint by (run, stage, path) with its digest and size."""
    sha, size = checkpoint_digest(path)
    row = {
        "run_id": run_id,
        "stage": stage,
        "path": str(Path(path)),
        "sha256": sha,
        "bytes": size,
        "config": config,
        "created_at": utcnow(),
    }
    cat.upsert_rows("checkpoints", [row], key=["run_id", "stage", "path"])


def record_metrics(
    cat: Catalog,
    run_id: str,
    stage: str,
    rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    replace: bool = False,
) -> int:
    """Append metric rows (step, epoch, seen, split, name, value[, time]); ``replace``
    first deletes the (run, stage)'s metrics, in the same transaction."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if len(df) == 0 and not replace:
        return 0
    df["run_id"], df["stage"] = run_id, stage
    now = utcnow()
    if "time" not in df.columns:
        df["time"] = [now] * len(df)
    else:
        df["time"] = [now if v is None or v is pd.NaT else v for v in df["time"]]
    if replace:
        return cat.replace_rows("metrics", df, where={"run_id": run_id, "stage": stage})
    return cat.insert_rows("metrics", df)


def metric_rows(n: int, run: str) -> list[dict]:
    """``n`` pretrain metric rows of run ``run`` (steps 0..n-1, value = step)."""
    return [{"run_id": run, "stage": "pretrain", "step": i, "value": float(i)} for i in range(n)]


def published_catalog(path: Path, n_rows: int, *, lock_timeout: float) -> Catalog:
    """A catalog file at ``path`` holding ``n_rows`` metric rows of run ``before``, with
    a published copy."""
    cat = Catalog(path, lock_timeout=lock_timeout)
    cat.insert_rows("metrics", metric_rows(n_rows, "before"))
    cat.publish()
    return cat
