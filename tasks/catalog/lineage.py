"""Run and source records on top of the generic catalog access (mixed into
:class:`~tasks.catalog.store.Catalog`)."""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.catalog.values import utcnow

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")


class LineageRecords(abc.ABC):
    """A run's end and the downloads' trust records, built on the generic access declared
    here (and implemented by :class:`~tasks.catalog.store.Catalog`)."""

    @abc.abstractmethod
    def write(self, what: str, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
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
        rows = self.query_rows(
            "SELECT name, sha256, bytes FROM sources "
            "WHERE position(':' IN name) > 0 AND sha256 IS NOT NULL"
        )
        return {str(r["name"]).split(":", 1)[1]: (str(r["sha256"]), int(r["bytes"])) for r in rows}

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
