"""Lineage records on top of the generic writes: runs, stages, sources, checkpoints and
metrics (mixed into :class:`~tasks.catalog.store.Catalog`)."""

from __future__ import annotations

import abc
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.catalog.values import as_frame, checkpoint_digest, to_json, to_utc_naive, utcnow

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")


class LineageRecords(abc.ABC):
    """The catalog's record_* helpers, built on the generic writes declared here (and
    implemented by :class:`~tasks.catalog.store.Catalog`)."""

    @abc.abstractmethod
    def write(self, what: str, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """See :class:`~tasks.catalog.store.Catalog`."""

    @abc.abstractmethod
    def upsert_rows(
        self, table: str, rows: pd.DataFrame | Iterable[Mapping[str, Any]], key: Sequence[str]
    ) -> int:
        """See :class:`~tasks.catalog.store.Catalog`."""

    @abc.abstractmethod
    def insert_rows(self, table: str, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> int:
        """See :class:`~tasks.catalog.store.Catalog`."""

    @abc.abstractmethod
    def replace_rows(
        self,
        table: str,
        df: pd.DataFrame | Iterable[Mapping[str, Any]],
        *,
        where: Mapping[str, Any],
    ) -> int:
        """See :class:`~tasks.catalog.store.Catalog`."""

    @abc.abstractmethod
    def query_df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """See :class:`~tasks.catalog.store.Catalog`."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """See :class:`~tasks.catalog.store.Catalog`."""

    def source_digests(self) -> dict[str, tuple[str, int]]:
        """sha256 and size of every recorded downloaded file, keyed by its path relative to
        the datasets folder (rows named ``<source>:<path>``): the trust-on-first-use record
        that ``gpt.data.download.download_sources(trusted=...)`` holds later downloads to.
        Empty while there is no catalog yet."""
        if not self.exists():
            return {}
        df = self.query_df(
            "SELECT name, sha256, bytes FROM sources "
            "WHERE position(':' IN name) > 0 AND sha256 IS NOT NULL"
        )
        return {
            str(name).split(":", 1)[1]: (str(sha), int(nbytes))
            for name, sha, nbytes in zip(df["name"], df["sha256"], df["bytes"], strict=True)
        }

    def start_run(
        self,
        run_id: str,
        *,
        flow_run_id: str | None = None,
        profile: str | None = None,
        config: dict[str, Any] | None = None,
        git_rev: str | None = None,
    ) -> None:
        """Record a run as ``running`` (started now); rerunning the id replaces the row."""
        row = {
            "run_id": run_id,
            "flow_run_id": None if flow_run_id is None else str(flow_run_id),
            "profile": profile,
            "config": config,
            "git_rev": git_rev,
            "started_at": utcnow(),
            "ended_at": None,
            "status": "running",
        }
        self.upsert_rows("runs", [row], key=["run_id"])

    def end_run(self, run_id: str, status: str, message: str | None = None) -> None:
        """Set a run's final ``status``, ``ended_at`` (now) and ``message`` (why it
        failed or crashed)."""
        ended = utcnow()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            n = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if n:
                con.execute(
                    "UPDATE runs SET status = ?, ended_at = ?, message = ? WHERE run_id = ?",
                    [status, ended, message, run_id],
                )
            else:
                log.warning("end_run: run %s was never started; recording it now", run_id)
                con.execute(
                    "INSERT INTO runs (run_id, status, ended_at, message) VALUES (?, ?, ?, ?)",
                    [run_id, status, ended, message],
                )

        self.write("runs", body)

    def record_stage(
        self,
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
        """Upsert the (run, stage) row. ``running`` defaults ``started_at`` to now; other
        statuses default ``ended_at`` to now and keep an earlier ``started_at``."""
        now = utcnow()
        if status == "running":
            started_at = started_at or now
        else:
            ended_at = ended_at or now

        def body(con: duckdb.DuckDBPyConnection) -> None:
            started = started_at
            if started is None:
                prev = con.execute(
                    "SELECT started_at FROM stages WHERE run_id = ? AND stage = ?",
                    [run_id, stage],
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

        self.write("stages", body)

    def record_source(self, name: str, url: str, sha256: str, bytes: int) -> None:
        """Upsert a downloaded source by ``name`` (``fetched_at`` now)."""
        row = {
            "name": name,
            "url": url,
            "sha256": sha256,
            "bytes": int(bytes),
            "fetched_at": utcnow(),
        }
        self.upsert_rows("sources", [row], key=["name"])

    def record_checkpoint(
        self,
        run_id: str,
        stage: str,
        path: str | Path,
        *,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Record a checkpoint (upsert by run, stage, path) with its sha256 and bytes.

        For a folder holding ``model.safetensors`` that file is hashed; otherwise every
        file (sorted by relative path; path and contents hashed); a file is hashed as is.
        """
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
        self.upsert_rows("checkpoints", [row], key=["run_id", "stage", "path"])

    def record_metrics(
        self,
        run_id: str,
        stage: str,
        rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
        *,
        replace: bool = False,
    ) -> int:
        """Append metric rows (keys: step, epoch, seen, split, name, value[, time]).

        ``replace=True`` first deletes the (run, stage)'s metrics, in the same transaction.
        """
        import pandas as pd

        df = as_frame(rows)
        if len(df) == 0 and not replace:
            return 0
        df["run_id"] = run_id
        df["stage"] = stage
        now = utcnow()
        if "time" not in df.columns:
            df["time"] = [now] * len(df)
        else:
            df["time"] = [now if v is None or v is pd.NaT else v for v in df["time"]]
        if replace:
            return self.replace_rows("metrics", df, where={"run_id": run_id, "stage": stage})
        return self.insert_rows("metrics", df)
