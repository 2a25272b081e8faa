"""The catalog handle: datasets, runs, stages, metrics, checkpoints and evaluations.

One class over two backends (:class:`~tasks.catalog.settings.CatalogSettings` picks):
the embedded DuckDB file and a shared DuckLake (``connections.py``). Every public method
runs one transaction; writes are re-run when another writer wins a conflict, and a
:class:`CatalogError` names the catalog after ``lock_timeout`` seconds. Writers write the
live file and publish it (``publish.py``); ``snapshot=True`` reads the published file,
never waiting for a writer. Timestamps are naive ``TIMESTAMP`` values in UTC.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gpt.errors import CatalogError, CatalogLockedError
from tasks.catalog.connections import (
    close_connection,
    close_idle,
    give_back,
    is_write_refusal,
    lake_cursor,
    missing_catalog,
    open_file,
    pooled_depth,
    process_lock,
    retry_on_conflict,
    take_pooled,
)
from tasks.catalog.migrate import apply_steps, check_version, current_version
from tasks.catalog.publish import (
    due_or_deferred,
    needs_publish,
    note_write,
    publish_copy,
    seed_live,
    unpublished,
    wal_of,
)
from tasks.catalog.schema import SCHEMA_VERSION
from tasks.catalog.settings import CatalogSettings, S3Settings, lock_timeout_from_env
from tasks.catalog.tables import TableWrites
from tasks.catalog.values import inline_params

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")


class Catalog(TableWrites):
    """The project's catalog: a DuckDB file or a shared DuckLake.

    ``Catalog(path)`` is the DuckDB file at ``path``; ``Catalog(url=..., data_path=...)``
    a DuckLake (S3 settings from the environment); ``Catalog(settings=CatalogSettings(...))``
    either; ``Catalog()`` whatever the environment selects
    (:meth:`CatalogSettings.from_env`: ``GPTFLOW_CATALOG_URL``, else ``GPTFLOW_DB``, else
    ``artifacts/gptflow.duckdb``). Every public method does its work in one transaction.
    ``snapshot=True``: read the published file (what ``gptflow sql`` and people read;
    writes are refused); no effect on a lake, whose readers never block writers.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        lock_timeout: float | None = None,
        url: str | None = None,
        data_path: str | None = None,
        settings: CatalogSettings | None = None,
        snapshot: bool = False,
    ):
        if settings is None:
            timeout = lock_timeout_from_env() if lock_timeout is None else float(lock_timeout)
            if url is not None:
                settings = CatalogSettings.checked(
                    url=url, data_path=data_path, lock_timeout=timeout, s3=S3Settings.from_env()
                )
            elif path is not None:
                settings = CatalogSettings.checked(
                    path=Path(path).expanduser(), lock_timeout=timeout
                )
            else:
                settings = CatalogSettings.from_env().model_copy(update={"lock_timeout": timeout})
        elif path is not None or url is not None or data_path is not None:
            raise CatalogError("give Catalog either settings= or path/url/data_path, not both")
        elif lock_timeout is not None:
            settings = settings.model_copy(update={"lock_timeout": float(lock_timeout)})
        #: Where this catalog lives (see :class:`CatalogSettings`).
        self.settings: CatalogSettings = settings
        #: The DuckDB file people open (the published copy), or None for a DuckLake.
        self.path: Path | None = None if settings.is_lake else settings.file_path()
        #: The DuckDB file writers write, or None for a DuckLake.
        self.live_path: Path | None = None if settings.is_lake else settings.live_path()
        #: Reads go to the published file (and writes are refused).
        self.snapshot: bool = snapshot and not settings.is_lake
        #: Seconds to keep retrying a locked file / conflicting writes.
        self.lock_timeout: float = settings.lock_timeout
        self._migrated = False
        self._checked = False
        self._held: duckdb.DuckDBPyConnection | None = None
        self._held_read_only = False

    def __repr__(self) -> str:
        if self.path is not None:
            return f"Catalog({str(self.path)!r})"
        return f"Catalog(url={self.settings.location()!r})"

    @property
    def is_lake(self) -> bool:
        """True when this catalog is a DuckLake."""
        return self.settings.is_lake

    @property
    def location(self) -> str:
        """The file, or the lake URL (password hidden) and data path: for messages."""
        return self.settings.location()

    def _lock_key(self) -> str:
        return str(self.live_path) if self.live_path is not None else self.settings.lake_key()

    # ------------------------------------------------------------------ connections
    def _seeded_live(self) -> Path:
        """The live file, created from the published one when only that exists."""
        assert self.path is not None and self.live_path is not None
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        seed_live(self.live_path, self.path)
        return self.live_path

    def _open_file(
        self, read_only: bool, config: dict[str, Any] | None = None
    ) -> duckdb.DuckDBPyConnection:
        """The file to use, opened: writers get the live file (created from the published
        one if need be); readers the live file, or the published one when only that
        exists; snapshot readers the published file, or the live one when only that
        exists or a read-write connection holds the published file."""
        assert self.path is not None and self.live_path is not None
        live, published = self.live_path, self.path
        if not read_only:
            if self.snapshot:
                raise CatalogError(
                    f"this handle reads the published snapshot of {published}; write through "
                    "Catalog(...) without snapshot=True"
                )
            return open_file(
                self._seeded_live(), read_only=False, timeout=self.lock_timeout, config=config
            )
        if not self.exists():
            raise missing_catalog(published)
        if self.snapshot and (live, published) in unpublished():
            # this process wrote since its last publish: its reads see its writes
            Catalog(settings=self.settings, lock_timeout=self.lock_timeout).publish()
        if self.snapshot and published.exists():
            try:
                return open_file(published, read_only=True, timeout=0, config=config)
            except CatalogLockedError:
                if not live.exists():
                    raise
                log.info("%s is held open for writing elsewhere; reading %s", published, live)
        target = live if live.exists() else published
        return open_file(target, read_only=True, timeout=self.lock_timeout, config=config)

    @contextlib.contextmanager
    def _open(
        self, read_only: bool, config: dict[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection (file) or cursor (lake) for the ``with`` block, nothing else
        (the held one inside :meth:`held`)."""
        if self._held is not None:
            if self._held_read_only and not read_only:
                raise CatalogError(
                    f"this handle holds a read-only connection to {self.location} "
                    "(Catalog.held(read_only=True)); write after the block"
                )
            yield self._held
            return
        if self.path is None:
            with lake_cursor(self.settings, read_only=read_only) as cur:
                yield cur
            return
        with self._file_connection(read_only, config) as con:
            yield con

    @contextlib.contextmanager
    def _file_connection(
        self, read_only: bool, config: dict[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the catalog file for the ``with`` block: inside a
        :func:`catalog_session` the process's pooled write connection to the live file
        (a reader's block in a read-only transaction), else one opened for the block."""
        assert self.path is not None and self.live_path is not None
        if not pooled_depth() or self.snapshot or config:
            close_idle(self.live_path)  # DuckDB refuses two configurations of one file
            con = self._open_file(read_only, config)
            try:
                yield con
            finally:
                close_connection(con)
            return
        if read_only and not self.exists():
            raise missing_catalog(self.path)
        con = take_pooled(self._seeded_live(), self.lock_timeout)
        try:
            if read_only:
                con.execute("BEGIN TRANSACTION READ ONLY")
            yield con
        finally:
            give_back(self.live_path, con)

    @contextlib.contextmanager
    def held(self, *, read_only: bool = False) -> Iterator[Catalog]:
        """Keep one connection open for the ``with`` block: this handle's transactions
        and queries all run on it (a rebuild's writes, a command's queries open and
        close the file once). A writer makes other processes wait for the block's end;
        ``read_only`` holds one reader (one snapshot) and refuses writes. No effect on a
        lake (cheap cursors) or inside a block already holding one."""
        if self.path is None or self._held is not None:
            yield self
            return
        if not read_only and not self._migrated:
            self.migrate()
        with process_lock(self._lock_key()), self._file_connection(read_only) as con:
            self._check_version(con)
            self._held, self._held_read_only = con, read_only
            try:
                yield self
            finally:
                self._held = None

    # ------------------------------------------------------------------ publishing
    def _publish_in(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Publish through ``con``, the open write connection to the live file; a failure
        is logged (the rows are safe in the live file; the next publish catches up)."""
        import duckdb

        assert self.path is not None and self.live_path is not None
        try:
            publish_copy(con, self.live_path, self.path)
            return True
        except (OSError, duckdb.Error) as exc:
            log.warning("could not publish the catalog %s: %s", self.path, exc)
            return False

    def publish(self, *, soon: bool = False) -> bool:
        """Put a copy of the live file in place of the published one now, if the live
        file holds anything the published one lacks (written by any process). ``soon``
        (run and stage events): now when this process last published
        :data:`~tasks.catalog.publish.PUBLISH_GAP` seconds ago or more, else once that
        gap has passed. Returns whether it published now; a lake or a snapshot handle has
        nothing to publish."""
        if self.path is None or self.live_path is None or self.snapshot:
            return False
        if not needs_publish(self.live_path, self.path):
            return False
        later = functools.partial(publish_quietly, self.path)
        if soon and not due_or_deferred(self.live_path, self.path, later):
            return False
        with process_lock(self._lock_key()), self._open(read_only=False) as con:
            if not needs_publish(self.live_path, self.path):
                return False
            return self._publish_in(con)

    def install(self, source: Catalog) -> None:
        """Make the database of ``source`` (another catalog file, e.g. one rebuilt beside
        this one) this catalog's: its live file replaces this one — while this one is held,
        so no writer is half-way — and is published. ``source`` is left without files."""
        if self.path is None or self.live_path is None or source.live_path is None:
            raise CatalogError("install works on DuckDB catalog files, not on a DuckLake")
        assert source.path is not None
        with process_lock(source._lock_key()), source._open(read_only=False) as con:
            con.execute("CHECKPOINT")  # the source's live file stands alone
        close_idle(source.live_path)
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        with process_lock(self._lock_key()):
            close_idle(self.live_path)  # a pooled connection must not outlive its file
            held = (
                open_file(self.live_path, read_only=False, timeout=self.lock_timeout)
                if self.live_path.exists()
                else None
            )
            try:
                wal_of(self.live_path).unlink(missing_ok=True)  # never replayed on the new file
                os.replace(source.live_path, self.live_path)
            finally:
                if held is not None:
                    close_connection(held)
        for leftover in (source.path, wal_of(source.path), wal_of(source.live_path)):
            leftover.unlink(missing_ok=True)
        self._migrated = self._checked = False
        self.publish()

    @contextlib.contextmanager
    def connect(
        self, read_only: bool = False, config: dict[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the ``with`` block (lock errors retried); a DuckDB
        file is opened with DuckDB ``config`` (e.g. ``enable_external_access``).

        The first write-open migrates the schema; a read-only open of a missing file or
        of a file written by a newer gptflow raises :class:`CatalogError`. Statements run
        on it directly are not retried on lake conflicts: use :meth:`write` for that.
        """
        if not read_only and not self._migrated:
            self.migrate()
        with process_lock(self._lock_key()), self._open(read_only, config) as con:
            self._check_version(con)
            yield con

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse a catalog a newer gptflow wrote (once per handle)."""
        if not self._checked:
            check_version(con, self.location)
            self._checked = True

    def migrate(self, target: int | None = None) -> int:
        """Apply missing migration steps (idempotent, safe from several processes at
        once); returns the schema version. ``target`` stops at an older version (used
        to test upgrades)."""
        import duckdb

        target = SCHEMA_VERSION if target is None else min(int(target), SCHEMA_VERSION)
        if self.snapshot:  # a writer migrates the live file and publishes it
            version = Catalog(settings=self.settings).migrate(target)
            self._migrated = version >= SCHEMA_VERSION
            return version

        def attempt() -> int:
            with process_lock(self._lock_key()), self._open(read_only=False) as con:
                before = current_version(con)
                version = apply_steps(con, target, lake=self.is_lake, location=self.location)
                # readers of the published file see the schema as soon as it exists
                if self.path is not None and (version > before or not self.path.exists()):
                    self._publish_in(con)
                return version

        try:
            version = retry_on_conflict(
                attempt, timeout=self.lock_timeout, what="migrate", where=self.location
            )
        except duckdb.Error as exc:
            raise CatalogError(
                f"migrating the catalog {self.location} to schema version {target} failed: {exc}"
            ) from exc
        self._migrated = version >= SCHEMA_VERSION
        self._checked = True
        return version

    def write(self, what: str, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``body(con)`` inside BEGIN/COMMIT on a write connection; ROLLBACK on error.

        The whole transaction is re-run while it loses a write conflict to another
        writer (DuckLake), so ``body`` must only read its inputs and the connection.
        DuckDB errors become a :class:`CatalogError` naming ``what``; others pass through.
        """
        import duckdb

        def attempt() -> T:
            with self.connect(read_only=False) as con:
                con.execute("BEGIN TRANSACTION")
                try:
                    out = body(con)
                    con.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(Exception):
                        con.execute("ROLLBACK")
                    raise
                if self.path is not None and note_write(self.live_path, self.path):
                    self._publish_in(con)
                return out

        try:
            return retry_on_conflict(
                attempt, timeout=self.lock_timeout, what=f"writing {what}", where=self.location
            )
        except duckdb.Error as exc:
            raise CatalogError(
                f"writing catalog table {what!r} in {self.location} failed and was "
                f"rolled back (earlier rows are unchanged): {exc}"
            ) from exc

    # ------------------------------------------------------------------ reads
    def query_df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run ``sql`` on a read-only connection and return a DataFrame."""
        return self._query(sql, params, lambda res: res.df())

    def query_rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run ``sql`` on a read-only connection and return its rows as dicts (no pandas:
        what a cached rerun's few look-ups use)."""

        def rows(res: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            names = [d[0] for d in res.description or []]
            return [dict(zip(names, row, strict=True)) for row in res.fetchall()]

        return self._query(sql, params, rows)

    def _query(
        self,
        sql: str,
        params: Sequence[Any] | None,
        fetch: Callable[[duckdb.DuckDBPyConnection], T],
    ) -> T:
        import duckdb

        with self.connect(read_only=True) as con:
            try:
                return fetch(con.execute(*inline_params(sql, params)))
            except duckdb.Error as exc:
                if is_write_refusal(exc):
                    raise CatalogError(
                        f"queries open the catalog {self.location} read-only; use the write "
                        f"methods (replace_rows, insert_rows, ...) to change it: {exc}"
                    ) from exc
                raise CatalogError(f"query on the catalog {self.location} failed: {exc}") from exc

    def exists(self) -> bool:
        """Whether there is a catalog to read (a lake always counts)."""
        return self.settings.exists()


#: Bound on waiting for other writers when publishing off the writer's path (deferred,
#: at exit): they publish too.
EXIT_PUBLISH_TIMEOUT = 10.0


def publish_quietly(published: Path) -> None:
    """Publish the catalog file ``published`` now; a failure is only logged (never fail
    an exit or a timer: the next publish catches up)."""
    try:
        Catalog(published, lock_timeout=EXIT_PUBLISH_TIMEOUT).publish()
    except Exception as exc:
        log.warning("could not publish the catalog %s: %s", published, exc)


@atexit.register
def _publish_at_exit() -> None:
    """What a command wrote reaches the published file."""
    for _, published in unpublished():
        publish_quietly(published)
