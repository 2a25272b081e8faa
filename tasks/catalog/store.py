"""The DuckDB catalog: datasets, runs, stages, metrics, checkpoints and evaluations.

DuckDB lets one process at a time hold a database file open, and while a writer holds it
even read-only opens from other processes fail (FACTS.md §7). So every operation here
opens the file, runs one transaction and closes it again, and opening is retried with
backoff on the lock error, in writers and readers alike. After the bound
(``lock_timeout``, default 60 s, ``GPTFLOW_DB_LOCK_TIMEOUT`` overrides) a
:class:`~gpt.errors.CatalogError` names the file and the PID holding the lock.

The schema is versioned: :data:`MIGRATIONS` is an append-only list of steps; the
``schema_version`` table records which were applied. Never edit a released step, add a
new one.

Timestamps are stored as naive ``TIMESTAMP`` values in UTC.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError, CheckpointError
from gpt.paths import default_db_path
from tasks.catalog.schema import KNOWN_TABLES, MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

log = logging.getLogger(__name__)

#: Default bound, in seconds, on retrying a locked database file.
DEFAULT_LOCK_TIMEOUT = 60.0

_LOCK_RE = re.compile(r"Could not set lock|Conflicting lock", re.IGNORECASE)
_PID_RE = re.compile(r"PID (\d+)")
_READONLY_RE = re.compile(r"read-only mode|read_only|in read-only", re.IGNORECASE)

# One lock per database file within this process: DuckDB refuses two connections with
# different configurations (read-only vs read-write) to one file in a process, and
# serialising in-process operations avoids write-write transaction conflicts too.
_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(str(path), threading.RLock())


def utcnow() -> dt.datetime:
    """Now, in UTC, as a naive datetime (how the catalog stores timestamps)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _to_utc_naive(value: Any) -> Any:
    """A timestamp-like value converted to naive UTC (strings parsed; naive = UTC)."""
    import pandas as pd

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value is pd.NaT:
        return None
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        return None
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_pydatetime()


def _to_json(value: Any) -> str | None:
    """A JSON column value: dicts/lists/numbers serialised; valid JSON strings kept."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return json.dumps(value)
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lock_timeout_from_env() -> float:
    env = os.environ.get("GPTFLOW_DB_LOCK_TIMEOUT")
    if not env:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return float(env)
    except ValueError as exc:
        raise CatalogError(
            f"GPTFLOW_DB_LOCK_TIMEOUT={env!r} is not a number of seconds; unset it or "
            "set e.g. GPTFLOW_DB_LOCK_TIMEOUT=60"
        ) from exc


def _open_with_retry(
    path: Path, *, read_only: bool, timeout: float, config: dict[str, Any] | None = None
) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` retried with jittered exponential backoff on the lock error."""
    import duckdb

    deadline = time.monotonic() + max(0.0, timeout)
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as exc:
            msg = str(exc)
            if not _LOCK_RE.search(msg):
                if read_only and "does not exist" in msg:
                    raise CatalogError(
                        f"the catalog {path} does not exist yet; run the pipeline first "
                        "(e.g. `gptflow run`) or point --db / GPTFLOW_DB at an existing file"
                    ) from exc
                raise CatalogError(f"cannot open the catalog {path}: {msg}") from exc
            now = time.monotonic()
            if now >= deadline:
                m = _PID_RE.search(msg)
                holder = f"PID {m.group(1)}" if m else "an unknown process"
                raise CatalogError(
                    f"the catalog {path} is locked by another process ({holder}) and stayed "
                    f"locked for {timeout:g} s; DuckDB lets one process at a time open the "
                    "file. Wait for that process to finish (or stop it), or raise "
                    "GPTFLOW_DB_LOCK_TIMEOUT, then retry"
                ) from exc
            sleep = min(delay * (0.5 + random.random()), deadline - now)
            log.debug("catalog %s locked (%s); retrying in %.3f s", path, msg, sleep)
            time.sleep(max(sleep, 0.0))
            delay = min(delay * 1.6, 1.0)


class Catalog:
    """The project's DuckDB catalog at ``path`` (default :func:`default_db_path`).

    Every public method opens the file, does its work in one transaction and closes it.
    """

    def __init__(self, path: str | Path | None = None, *, lock_timeout: float | None = None):
        self.path: Path = Path(path).expanduser() if path is not None else default_db_path()
        #: Seconds to keep retrying a locked file before raising :class:`CatalogError`.
        self.lock_timeout: float = (
            _lock_timeout_from_env() if lock_timeout is None else float(lock_timeout)
        )
        self._migrated = False
        self._checked = False

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # ------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the ``with`` block (lock errors retried).

        The first write-open migrates the schema; a read-only open of a missing file or
        of a file written by a newer gptflow raises :class:`CatalogError`.
        """
        if read_only and not self.path.exists():
            raise CatalogError(
                f"the catalog {self.path} does not exist yet; run the pipeline first "
                "(e.g. `gptflow run`) or point --db / GPTFLOW_DB at an existing file"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with _process_lock(self.path):
            con = _open_with_retry(self.path, read_only=read_only, timeout=self.lock_timeout)
            try:
                if read_only and not self._checked:
                    self._check_version(con)
                    self._checked = True
                elif not read_only and not self._migrated:
                    self._migrate(con)
                    self._migrated = self._checked = True
                yield con
            finally:
                con.close()

    def _current_version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_name = 'schema_version'"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> int:
        version = self._current_version(con)
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"the catalog {self.path} has schema version {version}, newer than this "
                f"gptflow knows ({SCHEMA_VERSION}); upgrade gptflow or use another --db / "
                "GPTFLOW_DB"
            )
        return version

    def _migrate(self, con: duckdb.DuckDBPyConnection, target: int | None = None) -> int:
        version = self._check_version(con)
        target = SCHEMA_VERSION if target is None else min(int(target), SCHEMA_VERSION)
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)"
        )
        for step in range(version, target):
            con.execute("BEGIN TRANSACTION")
            try:
                for stmt in MIGRATIONS[step]:
                    con.execute(stmt)
                con.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    [step + 1, utcnow()],
                )
                con.execute("COMMIT")
            except Exception as exc:
                con.execute("ROLLBACK")
                raise CatalogError(
                    f"migrating the catalog {self.path} to schema version {step + 1} failed: {exc}"
                ) from exc
            log.info("catalog %s migrated to schema version %d", self.path, step + 1)
        return max(version, target)

    def migrate(self, target: int | None = None) -> int:
        """Apply missing migration steps (idempotent); returns the schema version.

        ``target`` stops at an older version (used to test upgrades).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _process_lock(self.path):
            con = _open_with_retry(self.path, read_only=False, timeout=self.lock_timeout)
            try:
                version = self._migrate(con, target)
            finally:
                con.close()
        self._migrated = version >= SCHEMA_VERSION
        return version

    def schema_version(self) -> int:
        """The schema version recorded in the file (0 for a fresh/missing file)."""
        if not self.path.exists():
            return 0
        with self.connect(read_only=True) as con:
            return self._current_version(con)

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
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
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
                f"columns {unknown} are not in catalog table {table!r} of {self.path}; "
                f"its columns are {list(cols)}"
            )
        for col in df.columns:
            dtype = cols[col].upper()
            if dtype == "JSON":
                df[col] = pd.Series([_to_json(v) for v in df[col]], index=df.index, dtype=object)
            elif dtype.startswith("TIMESTAMP"):
                df[col] = pd.Series(
                    [_to_utc_naive(v) for v in df[col]], index=df.index, dtype=object
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
        cond = " AND ".join(f"{_quote_ident(k)} IS NOT DISTINCT FROM ?" for k in where)
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
            target = ", ".join(_quote_ident(c) for c in names)
            select = ", ".join(
                f"CAST({_quote_ident(c)} AS {cols[c]}) AS {_quote_ident(c)}" for c in names
            )
            con.execute(f"INSERT INTO {table} ({target}) SELECT {select} FROM {view}")
        finally:
            con.unregister(view)
        return len(df)

    @contextlib.contextmanager
    def _transaction(self, table: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection inside BEGIN/COMMIT; ROLLBACK (and re-raise) on error."""
        import duckdb

        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")
                if isinstance(exc, duckdb.Error):
                    raise CatalogError(
                        f"writing catalog table {table!r} in {self.path} failed and was "
                        f"rolled back (earlier rows are unchanged): {exc}"
                    ) from exc
                raise

    # ------------------------------------------------------------------ generic writes
    def replace_rows(
        self,
        table: str,
        df: pd.DataFrame | Sequence[Mapping[str, Any]],
        *,
        where: Mapping[str, Any],
    ) -> int:
        """Delete the rows matching ``where`` and insert ``df``, in ONE transaction.

        Missing columns become NULL; ``where`` values are filled into rows lacking them.
        Returns the number of rows inserted.
        """
        self._check_table(table)
        with self._transaction(table) as con:
            cols = self._columns(con, table)
            df = self._frame(table, df, cols)
            for k, v in where.items():
                if k not in df.columns and len(df):
                    df[k] = [v] * len(df)
            self._delete_where(con, table, where, cols)
            return self._insert_df(con, table, df, cols)

    def replace_many(
        self,
        items: Sequence[tuple[str, pd.DataFrame | Sequence[Mapping[str, Any]], Mapping[str, Any]]],
    ) -> int:
        """Several ``replace_rows`` ``(table, rows, where)`` in ONE transaction: either
        every table gets its new rows or none changes. Returns the rows inserted."""
        for table, _, _ in items:
            self._check_table(table)
        names = ", ".join(t for t, _, _ in items)
        total = 0
        with self._transaction(names) as con:
            for table, rows, where in items:
                cols = self._columns(con, table)
                df = self._frame(table, rows, cols)
                for k, v in where.items():
                    if k not in df.columns and len(df):
                        df[k] = [v] * len(df)
                self._delete_where(con, table, where, cols)
                total += self._insert_df(con, table, df, cols)
        return total

    def replace_from_parquet(
        self, items: Sequence[tuple[str, str | Path, Sequence[Mapping[str, Any]]]]
    ) -> int:
        """For each ``(table, parquet file, wheres)``: delete the rows matching any of the
        ``wheres`` and insert the file's rows, all in ONE transaction. The file's columns
        must be the table's (as written by :mod:`tasks.rows`). Returns the rows inserted."""
        for table, _, _ in items:
            self._check_table(table)
        names = ", ".join(t for t, _, _ in items)
        total = 0
        with self._transaction(names) as con:
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
                target = ", ".join(_quote_ident(c) for c in have)
                select = ", ".join(
                    f"CAST({_quote_ident(c)} AS {cols[c]}) AS {_quote_ident(c)}" for c in have
                )
                total += con.execute(
                    f"INSERT INTO {table} ({target}) SELECT {select} FROM read_parquet('{src}')"
                ).fetchone()[0]
        return total

    def insert_rows(self, table: str, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> int:
        """Append rows (one transaction); returns the number inserted."""
        self._check_table(table)
        with self._transaction(table) as con:
            cols = self._columns(con, table)
            return self._insert_df(con, table, self._frame(table, rows, cols), cols)

    def upsert_rows(
        self,
        table: str,
        rows: pd.DataFrame | Sequence[Mapping[str, Any]],
        key: Sequence[str],
    ) -> int:
        """Replace rows having the same ``key`` values as a given row, then insert."""
        self._check_table(table)
        key = list(key)
        if not key:
            raise CatalogError(f"upsert_rows on {table!r} needs at least one key column")
        with self._transaction(table) as con:
            cols = self._columns(con, table)
            df = self._frame(table, rows, cols)
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
                    f"t.{_quote_ident(k)} IS NOT DISTINCT FROM CAST(k.{_quote_ident(k)} AS {cols[k]})"
                    for k in key
                )
                con.execute(
                    f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM {view} k WHERE {cond})"
                )
            finally:
                con.unregister(view)
            return self._insert_df(con, table, df, cols)

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
                        f"query_df opens the catalog {self.path} read-only; use the write "
                        f"methods (replace_rows, insert_rows, ...) to change it: {exc}"
                    ) from exc
                raise CatalogError(f"query on the catalog {self.path} failed: {exc}") from exc

    # ------------------------------------------------------------------ lineage helpers
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

    def end_run(self, run_id: str, status: str) -> None:
        """Set a run's final ``status`` and ``ended_at`` (now)."""
        with self._transaction("runs") as con:
            n = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if n:
                con.execute(
                    "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?",
                    [status, utcnow(), run_id],
                )
            else:
                log.warning("end_run: run %s was never started; recording it now", run_id)
                con.execute(
                    "INSERT INTO runs (run_id, status, ended_at) VALUES (?, ?, ?)",
                    [run_id, status, utcnow()],
                )

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
        with self._transaction("stages") as con:
            if started_at is None:
                prev = con.execute(
                    "SELECT started_at FROM stages WHERE run_id = ? AND stage = ?",
                    [run_id, stage],
                ).fetchone()
                started_at = prev[0] if prev else None
            con.execute("DELETE FROM stages WHERE run_id = ? AND stage = ?", [run_id, stage])
            con.execute(
                "INSERT INTO stages (run_id, stage, status, started_at, ended_at, cache_hit, "
                "outputs, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    stage,
                    status,
                    _to_utc_naive(started_at),
                    _to_utc_naive(ended_at),
                    cache_hit,
                    _to_json(outputs),
                    message,
                ],
            )

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

    def source_digests(self) -> dict[str, tuple[str, int]]:
        """sha256 and size of every recorded downloaded file, keyed by its path relative to
        the datasets folder (rows named ``<source>:<path>``): the trust-on-first-use record
        that ``gpt.data.download.download_sources(trusted=...)`` holds later downloads to.
        Empty while the catalog file does not exist yet."""
        if not self.path.exists():
            return {}
        df = self.query_df(
            "SELECT name, sha256, bytes FROM sources "
            "WHERE position(':' IN name) > 0 AND sha256 IS NOT NULL"
        )
        return {
            str(name).split(":", 1)[1]: (str(sha), int(nbytes))
            for name, sha, nbytes in zip(df["name"], df["sha256"], df["bytes"], strict=True)
        }

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

        df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
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


def checkpoint_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a checkpoint file or folder (see ``record_checkpoint``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; cannot record it in the catalog")
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), p.stat().st_size
    total = 0
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p).as_posix().encode()
        h.update(rel + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
        total += f.stat().st_size
    return h.hexdigest(), total


def _is_write_refusal(exc: BaseException) -> bool:
    import duckdb

    msg = str(exc)
    if isinstance(exc, duckdb.PermissionException):
        return True
    return bool(_READONLY_RE.search(msg)) and "Cannot execute statement" in msg
