"""The catalog: datasets, runs, stages, metrics, checkpoints and evaluations.

Two backends behind one class (:class:`~tasks.catalog.settings.CatalogSettings` picks):
the embedded DuckDB file (default) and a DuckLake shared by several machines
(``connections.py`` says how each is opened). Every public method runs one transaction;
writes are re-run when another writer wins a conflict, and a :class:`CatalogError` names
the catalog after ``lock_timeout`` seconds (default 60, ``GPTFLOW_DB_LOCK_TIMEOUT``).

The DuckDB file is two files (``publish.py``): writers write the live file and publish
copies of it over the file people open. A :class:`Catalog` reads the live file (it sees
its own writes); ``Catalog(..., snapshot=True)`` reads the published file, as people's
tools do: it never waits for a writer and never makes one wait.

The schema is versioned: :data:`MIGRATIONS` is an append-only list of steps; the
``schema_version`` table records which were applied. Never edit a released step, add a
new one.

Timestamps are stored as naive ``TIMESTAMP`` values in UTC.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gpt.errors import CatalogError, CatalogLockedError
from tasks.catalog.connections import lake_cursor, open_file, process_lock, retry_on_conflict
from tasks.catalog.lineage import LineageRecords
from tasks.catalog.publish import (
    needs_publish,
    note_write,
    publish_copy,
    seed_live,
    unpublished,
    wal_of,
)
from tasks.catalog.schema import KNOWN_TABLES, MIGRATIONS, SCHEMA_VERSION, migration_step
from tasks.catalog.settings import (
    DEFAULT_LOCK_TIMEOUT,
    CatalogSettings,
    S3Settings,
    lock_timeout_from_env,
)
from tasks.catalog.values import (
    as_frame,
    checkpoint_digest,
    quote_ident,
    to_json,
    to_utc_naive,
    utcnow,
)

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")

_READONLY_RE = re.compile(r"read-only mode|read_only|in read-only", re.IGNORECASE)

# Kept under their earlier names for the modules and tests that import them from here.
_open_with_retry = open_file
_process_lock = process_lock
_lock_timeout_from_env = lock_timeout_from_env
__all__ = ["DEFAULT_LOCK_TIMEOUT", "MIGRATIONS", "Catalog", "checkpoint_digest", "utcnow"]


class Catalog(LineageRecords):
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
            try:
                if url is not None:
                    settings = CatalogSettings(
                        url=url, data_path=data_path, lock_timeout=timeout, s3=S3Settings.from_env()
                    )
                elif path is not None:
                    settings = CatalogSettings(path=Path(path).expanduser(), lock_timeout=timeout)
                else:
                    settings = CatalogSettings.from_env().model_copy(
                        update={"lock_timeout": timeout}
                    )
            except ValueError as exc:  # pydantic's ValidationError
                raise CatalogError(f"invalid catalog setting: {exc}") from exc
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
    def _missing(self) -> CatalogError:
        return CatalogError(
            f"the catalog {self.path} does not exist yet; run the pipeline first "
            "(e.g. `gptflow run`) or point --db / GPTFLOW_DB at an existing file"
        )

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
            live.parent.mkdir(parents=True, exist_ok=True)
            seed_live(live, published)
            return open_file(live, read_only=False, timeout=self.lock_timeout, config=config)
        if not (live.exists() or published.exists()):
            raise self._missing()
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
    def _open(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection (file) or cursor (lake) for the ``with`` block, nothing else."""
        if self.path is None:
            with lake_cursor(self.settings, read_only=read_only) as cur:
                yield cur
            return
        con = self._open_file(read_only)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def file_reader(
        self, config: dict[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection, opened with DuckDB ``config``, to the file this handle
        reads (the published one for a snapshot handle), for the ``with`` block."""
        if self.path is None:
            raise CatalogError("file_reader works on DuckDB catalog files, not on a DuckLake")
        with process_lock(self._lock_key()):
            con = self._open_file(True, config)
            try:
                yield con
            finally:
                con.close()

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

    def publish(self) -> bool:
        """Put a copy of the live file in place of the published one now, if the live
        file holds anything the published one lacks (written by any process). Returns
        whether it published; a lake or a snapshot handle has nothing to publish."""
        if self.path is None or self.live_path is None or self.snapshot:
            return False
        if not needs_publish(self.live_path, self.path):
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
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        with process_lock(self._lock_key()):
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
                    held.close()
        for leftover in (source.path, wal_of(source.path), wal_of(source.live_path)):
            leftover.unlink(missing_ok=True)
        self._migrated = self._checked = False
        self.publish()

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the ``with`` block (lock errors retried).

        The first write-open migrates the schema; a read-only open of a missing file or
        of a file written by a newer gptflow raises :class:`CatalogError`. Statements run
        on it directly are not retried on lake conflicts: use :meth:`write` for that.
        """
        if not read_only and not self._migrated:
            self.migrate()
        with process_lock(self._lock_key()), self._open(read_only) as con:
            if not self._checked:
                self._check_version(con)
                self._checked = True
            yield con

    def _current_version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_catalog = "
            "current_database() AND table_schema = 'main' AND table_name = 'schema_version'"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> int:
        version = self._current_version(con)
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"the catalog {self.location} has schema version {version}, newer than this "
                f"gptflow knows ({SCHEMA_VERSION}); upgrade gptflow or use another --db / "
                "GPTFLOW_DB / GPTFLOW_CATALOG_URL"
            )
        return version

    def _migrate_once(self, con: duckdb.DuckDBPyConnection, target: int) -> int:
        """Apply the missing steps up to ``target``, one transaction each."""
        version = self._check_version(con)
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)"
        )
        for step in range(version, target):
            con.execute("BEGIN TRANSACTION")
            try:
                if self._current_version(con) > step:  # another process applied it
                    con.execute("ROLLBACK")
                    continue
                for stmt in migration_step(step, lake=self.is_lake):
                    con.execute(stmt)
                con.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    [step + 1, utcnow()],
                )
                con.execute("COMMIT")
            except Exception:
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")
                raise
            log.info("catalog %s migrated to schema version %d", self.location, step + 1)
        return max(version, target)

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
                before = self._current_version(con)
                version = self._migrate_once(con, target)
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

    def schema_version(self) -> int:
        """The schema version recorded in the catalog (0 for a fresh/missing file)."""
        if not self.exists():
            return 0
        with process_lock(self._lock_key()), self._open(read_only=True) as con:
            return self._current_version(con)

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

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_table(table: str) -> None:
        if table not in KNOWN_TABLES:
            raise CatalogError(
                f"unknown catalog table {table!r}; known tables: {', '.join(sorted(KNOWN_TABLES))}"
            )

    @staticmethod
    def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
        rows = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog "
            "= current_database() AND table_schema = 'main' AND table_name = ? "
            "ORDER BY ordinal_position",
            [table],
        ).fetchall()
        return {name: dtype for name, dtype in rows}

    def _frame(
        self, table: str, rows: pd.DataFrame | Sequence[Mapping[str, Any]], cols: dict[str, str]
    ) -> pd.DataFrame:
        """Rows as a DataFrame with table columns only, JSON/TIMESTAMP values normalised."""
        import pandas as pd

        df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        unknown = [c for c in df.columns if c not in cols]
        if unknown:
            raise CatalogError(
                f"columns {unknown} are not in catalog table {table!r} of {self.location}; "
                f"its columns are {list(cols)}"
            )
        for col in df.columns:
            dtype = cols[col].upper()
            if dtype == "JSON":
                df[col] = pd.Series([to_json(v) for v in df[col]], index=df.index, dtype=object)
            elif dtype.startswith("TIMESTAMP"):
                df[col] = pd.Series(
                    [to_utc_naive(v) for v in df[col]], index=df.index, dtype=object
                )
        return df

    def _delete_where(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        where: Mapping[str, Any],
        cols: dict[str, str],
    ) -> None:
        for key in where:
            if key not in cols:
                raise CatalogError(
                    f"where-column {key!r} is not in catalog table {table!r}; "
                    f"its columns are {list(cols)}"
                )
        if not where:
            raise CatalogError(
                f"replace_rows on {table!r} needs a non-empty `where` (e.g. run_id and "
                "stage); use a where that names the rows to replace"
            )
        cond = " AND ".join(f"{quote_ident(k)} IS NOT DISTINCT FROM ?" for k in where)
        con.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))

    def _insert_df(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        df: pd.DataFrame,
        cols: dict[str, str],
    ) -> int:
        if len(df) == 0 or len(df.columns) == 0:
            return 0
        names = list(df.columns)
        view = f"_gptflow_in_{os.getpid()}_{threading.get_ident()}"
        con.register(view, df)
        try:
            target = ", ".join(quote_ident(c) for c in names)
            select = ", ".join(
                f"CAST({quote_ident(c)} AS {cols[c]}) AS {quote_ident(c)}" for c in names
            )
            con.execute(f"INSERT INTO {table} ({target}) SELECT {select} FROM {view}")
        finally:
            con.unregister(view)
        return len(df)

    def _replace_in(
        self, con: duckdb.DuckDBPyConnection, table: str, rows: pd.DataFrame, where: Mapping
    ) -> int:
        cols = self._columns(con, table)
        df = self._frame(table, rows, cols)
        for k, v in where.items():
            if k not in df.columns and len(df):
                df[k] = [v] * len(df)
        self._delete_where(con, table, where, cols)
        return self._insert_df(con, table, df, cols)

    # ------------------------------------------------------------------ generic writes
    def replace_rows(
        self,
        table: str,
        df: pd.DataFrame | Iterable[Mapping[str, Any]],
        *,
        where: Mapping[str, Any],
    ) -> int:
        """Delete the rows matching ``where`` and insert ``df``, in ONE transaction.

        Missing columns become NULL; ``where`` values are filled into rows lacking them.
        Returns the number of rows inserted.
        """
        self._check_table(table)
        rows = as_frame(df)
        return self.write(table, lambda con: self._replace_in(con, table, rows, where))

    def replace_many(
        self,
        items: Sequence[tuple[str, pd.DataFrame | Iterable[Mapping[str, Any]], Mapping[str, Any]]],
    ) -> int:
        """Several ``replace_rows`` ``(table, rows, where)`` in ONE transaction: either
        every table gets its new rows or none changes. Returns the rows inserted."""
        for table, _, _ in items:
            self._check_table(table)
        frames = [(table, as_frame(rows), where) for table, rows, where in items]

        def body(con: duckdb.DuckDBPyConnection) -> int:
            return sum(self._replace_in(con, t, rows, where) for t, rows, where in frames)

        return self.write(", ".join(t for t, _, _ in frames), body)

    def replace_from_parquet(
        self, items: Sequence[tuple[str, str | Path, Sequence[Mapping[str, Any]]]]
    ) -> int:
        """For each ``(table, parquet file, wheres)``: delete the rows matching any of the
        ``wheres`` and insert the file's rows, all in ONE transaction. The file's columns
        must be the table's (as written by :mod:`tasks.rows`). Returns the rows inserted."""
        for table, _, _ in items:
            self._check_table(table)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            total = 0
            for table, path, wheres in items:
                cols = self._columns(con, table)
                src = str(path).replace("'", "''")
                desc = con.execute(f"SELECT * FROM read_parquet('{src}') LIMIT 0").description
                have = [d[0] for d in desc]
                unknown = [c for c in have if c not in cols]
                if unknown:
                    raise CatalogError(
                        f"{path}: columns {unknown} are not in catalog table {table!r}"
                    )
                for where in wheres:
                    self._delete_where(con, table, where, cols)
                target = ", ".join(quote_ident(c) for c in have)
                select = ", ".join(
                    f"CAST({quote_ident(c)} AS {cols[c]}) AS {quote_ident(c)}" for c in have
                )
                total += con.execute(
                    f"INSERT INTO {table} ({target}) SELECT {select} FROM read_parquet('{src}')"
                ).fetchone()[0]
            return total

        return self.write(", ".join(t for t, _, _ in items), body)

    def insert_rows(self, table: str, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> int:
        """Append rows (one transaction); returns the number inserted."""
        self._check_table(table)
        frame = as_frame(rows)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            cols = self._columns(con, table)
            return self._insert_df(con, table, self._frame(table, frame, cols), cols)

        return self.write(table, body)

    def upsert_rows(
        self,
        table: str,
        rows: pd.DataFrame | Iterable[Mapping[str, Any]],
        key: Sequence[str],
    ) -> int:
        """Replace rows having the same ``key`` values as a given row, then insert."""
        self._check_table(table)
        key = list(key)
        if not key:
            raise CatalogError(f"upsert_rows on {table!r} needs at least one key column")
        frame = as_frame(rows)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            cols = self._columns(con, table)
            df = self._frame(table, frame, cols)
            missing = [k for k in key if k not in df.columns]
            if missing:
                raise CatalogError(
                    f"upsert_rows on {table!r}: key columns {missing} are missing from the rows"
                )
            if len(df) == 0:
                return 0
            df = df.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
            view = f"_gptflow_keys_{os.getpid()}_{threading.get_ident()}"
            con.register(view, df[key])
            try:
                cond = " AND ".join(
                    f"t.{quote_ident(k)} IS NOT DISTINCT FROM CAST(k.{quote_ident(k)} AS {cols[k]})"
                    for k in key
                )
                con.execute(
                    f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM {view} k WHERE {cond})"
                )
            finally:
                con.unregister(view)
            return self._insert_df(con, table, df, cols)

        return self.write(table, body)

    # ------------------------------------------------------------------ reads
    def query_df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run ``sql`` on a read-only connection and return a DataFrame."""
        import duckdb

        with self.connect(read_only=True) as con:
            try:
                return con.execute(sql, list(params) if params else None).df()
            except duckdb.Error as exc:
                if _is_write_refusal(exc):
                    raise CatalogError(
                        f"query_df opens the catalog {self.location} read-only; use the write "
                        f"methods (replace_rows, insert_rows, ...) to change it: {exc}"
                    ) from exc
                raise CatalogError(f"query on the catalog {self.location} failed: {exc}") from exc

    def exists(self) -> bool:
        """Whether there is a catalog to read (a lake always counts)."""
        return self.settings.exists()

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


#: Bound on waiting for other writers when publishing at exit (they publish too).
EXIT_PUBLISH_TIMEOUT = 10.0


def publish_unpublished() -> None:
    """Publish every catalog file this process wrote and has not published (run at
    exit, so what a command wrote reaches the published file)."""
    for live, published in unpublished():
        try:
            cat = Catalog(published, lock_timeout=EXIT_PUBLISH_TIMEOUT)
            if cat.live_path == live:
                cat.publish()
        except Exception as exc:  # never fail an exit; the next publish catches up
            log.warning("could not publish the catalog %s at exit: %s", published, exc)


atexit.register(publish_unpublished)


def _is_write_refusal(exc: BaseException) -> bool:
    import duckdb

    msg = str(exc)
    if isinstance(exc, duckdb.PermissionException):
        return True
    return bool(_READONLY_RE.search(msg)) and "Cannot execute statement" in msg
