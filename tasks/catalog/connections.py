"""Opening the catalog: the DuckDB file (lock retries) or a DuckLake (extensions, S3
secret, ATTACH), and retrying the write conflicts several writers cause.

* **DuckDB file.** One process at a time may hold the file open, and while a writer holds
  it even read-only opens from other processes fail (FACTS.md §7). So writers write a file
  of their own (the live file; readers get published copies: ``publish.py``), every
  operation opens the file, runs one transaction and closes it, and opening is retried
  with jittered backoff on the lock error for ``lock_timeout`` seconds. Inside
  :func:`keep_idle` (a pipeline run), a closed connection stays open, idle, for
  :data:`IDLE_CLOSE_S` and serves the process's next operation in the same mode on the
  same file (a cached rerun's ~90 operations open the file ~25 times instead of ~90);
  other processes wait at most that long more.
* **DuckLake.** Metadata in PostgreSQL, data as Parquet under ``data_path``; any number of
  processes attach at once. Loading the extensions and attaching cost ~0.3 s, so each
  process keeps one in-memory DuckDB with the lake attached (per lake, per read-only/
  read-write; a forked child opens its own) and every operation runs on a fresh cursor.
  Each transaction reads the lake's latest snapshot. DuckLake retries snapshot-id clashes
  itself, but not update/delete conflicts ("Transaction conflict …") nor a table created
  by two writers at once ("… created by another transaction already"):
  :func:`retry_on_conflict` re-runs the whole transaction for those.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from gpt.errors import CatalogError, CatalogLockedError
from tasks.catalog.extensions import load_extension
from tasks.catalog.settings import CatalogSettings, redact

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The name the lake is attached under (and made the default database with ``USE``), so
#: queries name tables and views without a prefix, exactly as on the DuckDB file.
LAKE_ALIAS = "gptflow_lake"

_LOCK_RE = re.compile(r"Could not set lock|Conflicting lock", re.IGNORECASE)
_READONLY_RE = re.compile(r"read-only mode|read_only|in read-only", re.IGNORECASE)
_PID_RE = re.compile(r"PID (\d+)")

#: Errors that mean "another writer got there first; the whole transaction can be re-run":
#: DuckLake's own conflicts, a lake initialised by two processes at once, and PostgreSQL
#: serialisation failures surfacing through the metadata connection.
_CONFLICT_RE = re.compile(
    r"Transaction conflict"
    r"|created by another transaction"
    r"|write-write conflict"
    r"|Conflict on tuple deletion"
    r"|could not serialize access"
    r"|deadlock detected"
    r"|Failed to initialize DuckLake.*(?:duplicate key|already exists)",
    re.IGNORECASE | re.DOTALL,
)

#: At most this many attempts of one transaction, whatever the time bound says.
MAX_ATTEMPTS = 500

#: Conflicts retried in this process, by operation (for logs, tests and benchmarks).
CONFLICT_RETRIES: collections.Counter[str] = collections.Counter()

# One lock per catalog within this process: DuckDB refuses two connections with different
# configurations (read-only vs read-write) to one file in a process, and serialising
# in-process operations avoids write-write conflicts between threads too.
_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()

# (lake key, read_only) → an in-memory DuckDB with the lake attached.
_LAKES: dict[tuple[str, bool], duckdb.DuckDBPyConnection] = {}
_LAKES_GUARD = threading.Lock()
# Connections a forked child inherited from its parent: never used nor closed there
# (closing would end the parent's PostgreSQL sessions, which share the sockets).
_INHERITED: list[duckdb.DuckDBPyConnection] = []


def _after_fork_in_child() -> None:
    global _IDLE_GUARD, _KEEPERS, _LAKES_GUARD, _PROCESS_LOCKS_GUARD
    _INHERITED.extend(_LAKES.values())
    _INHERITED.extend(p.con for p in _IDLE.values())  # the parent's: its timers close them
    _IDLE.clear()
    _IDLE_GUARD = threading.Lock()
    _KEEPERS = 0
    _LAKES.clear()
    _LAKES_GUARD = threading.Lock()  # another thread of the parent may have held these
    _PROCESS_LOCKS_GUARD = threading.Lock()
    _PROCESS_LOCKS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def process_lock(key: str | Path) -> threading.RLock:
    """The in-process lock of one catalog (a file path or a lake key)."""
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(str(key), threading.RLock())


def _backoff(delay: float, deadline: float) -> float:
    """Sleep a jittered ``delay`` (never past ``deadline``); returns the next delay."""
    sleep = min(delay * (0.5 + random.random()), max(deadline - time.monotonic(), 0.0))
    time.sleep(max(sleep, 0.0))
    return min(delay * 1.6, 1.0)


# ---------------------------------------------------------------------- the DuckDB file
#: Seconds a closed connection to a catalog file stays open for this process's next
#: operation in the same mode before it is really closed.
IDLE_CLOSE_S = 0.5

_PoolKey = tuple[str, bool, tuple[tuple[str, Any], ...]]


@dataclass
class _Parked:
    """An idle connection: its file (device, inode) when it was opened, and the timer
    that closes it."""

    con: duckdb.DuckDBPyConnection
    file_id: tuple[int, int] | None
    timer: threading.Timer


# key -> the idle connection of that file and mode (taken out while in use)
_IDLE: dict[_PoolKey, _Parked] = {}
_IDLE_GUARD = threading.Lock()
# how many keep_idle() blocks are open in this process
_KEEPERS = 0


@contextlib.contextmanager
def keep_idle() -> Iterator[None]:
    """For the ``with`` block (e.g. one pipeline run, whose process is gptflow's alone),
    keep closed catalog-file connections idle for the next operation; at its end every
    idle connection is closed (outside such a block the file is closed after each
    operation, so code of the same process may open it with another mode right after)."""
    global _KEEPERS
    with _IDLE_GUARD:
        _KEEPERS += 1
    try:
        yield
    finally:
        with _IDLE_GUARD:
            _KEEPERS -= 1
            last = _KEEPERS == 0
        if last:
            close_idle()


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _close_quietly(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(Exception):
        con.close()


def _take_idle(key: _PoolKey, file_id: tuple[int, int] | None) -> duckdb.DuckDBPyConnection | None:
    """The idle connection for ``key`` if it still opens the same file; every other idle
    connection to that path or file is closed (DuckDB refuses a read-only and a
    read-write connection to one file in a process, and a replaced file must be
    reopened)."""
    found = None
    stale: list[_Parked] = []
    with _IDLE_GUARD:
        for k in list(_IDLE):
            parked = _IDLE[k]
            same_file = file_id is not None and parked.file_id == file_id
            if k == key and same_file:
                found = _IDLE.pop(k)
            elif k[0] == key[0] or same_file:
                stale.append(_IDLE.pop(k))
    for parked in stale:
        parked.timer.cancel()
        _close_quietly(parked.con)
    if found is None:
        return None
    found.timer.cancel()
    return found.con


def _park(key: _PoolKey, con: duckdb.DuckDBPyConnection, file_id: tuple[int, int] | None) -> None:
    """Keep ``con`` idle for :data:`IDLE_CLOSE_S` (rolled back to no open transaction);
    a connection that cannot be reused is closed."""
    import duckdb

    try:
        con.execute("ROLLBACK")  # a transaction a failed operation left open
    except duckdb.TransactionException:
        pass  # none was open
    except Exception:
        _close_quietly(con)
        return
    if file_id is None or not _KEEPERS:
        _close_quietly(con)
        return
    timer = threading.Timer(IDLE_CLOSE_S, _expire, args=(key, con))
    timer.daemon = True
    with _IDLE_GUARD:
        previous = _IDLE.pop(key, None)
        _IDLE[key] = _Parked(con, file_id, timer)
    if previous is not None:
        previous.timer.cancel()
        _close_quietly(previous.con)
    timer.start()


def _expire(key: _PoolKey, con: duckdb.DuckDBPyConnection) -> None:
    with _IDLE_GUARD:
        parked = _IDLE.get(key)
        if parked is None or parked.con is not con:
            return  # taken again (or replaced) since
        del _IDLE[key]
    _close_quietly(con)


def close_idle() -> None:
    """Close every idle connection now (at exit, and wherever a file is to be free)."""
    with _IDLE_GUARD:
        parked = list(_IDLE.values())
        _IDLE.clear()
    for p in parked:
        p.timer.cancel()
        _close_quietly(p.con)


atexit.register(close_idle)


class _LentConnection:
    """A DuckDB connection lent to one operation: everything is the connection's, but
    :meth:`close` keeps it idle for the next one (:func:`_park`)."""

    __slots__ = ("_con", "_file_id", "_key")

    def __init__(
        self, con: duckdb.DuckDBPyConnection, key: _PoolKey, file_id: tuple[int, int] | None
    ) -> None:
        self._con, self._key, self._file_id = con, key, file_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def __enter__(self) -> _LentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            _park(self._key, con, self._file_id)


def open_file(
    path: Path, *, read_only: bool, timeout: float, config: dict[str, Any] | None = None
) -> duckdb.DuckDBPyConnection:
    """A connection to the catalog file ``path``: this process's idle one of the same
    file and mode, else ``duckdb.connect`` retried with jittered exponential backoff on
    the lock error. Its ``close()`` keeps it idle for :data:`IDLE_CLOSE_S`."""
    key: _PoolKey = (str(path), read_only, tuple(sorted((config or {}).items())))
    con = _take_idle(key, _file_id(path))
    if con is None:
        con = _connect(path, read_only=read_only, timeout=timeout, config=config)
    return cast("duckdb.DuckDBPyConnection", _LentConnection(con, key, _file_id(path)))


def _connect(
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
            if time.monotonic() >= deadline:
                m = _PID_RE.search(msg)
                holder = f"PID {m.group(1)}" if m else "an unknown process"
                raise CatalogLockedError(
                    f"the catalog {path} is locked by another process ({holder}) and stayed "
                    f"locked for {timeout:g} s; DuckDB lets one process at a time open the "
                    "file. Wait for that process to finish (or stop it), or raise "
                    "GPTFLOW_DB_LOCK_TIMEOUT, then retry"
                ) from exc
            log.debug("catalog %s locked (%s); retrying", path, msg)
            delay = _backoff(delay, deadline)


# ---------------------------------------------------------------------- DuckLake
def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _create_s3_secret(con: duckdb.DuckDBPyConnection, settings: CatalogSettings) -> None:
    s3 = settings.s3
    if s3.key_id is None:
        return
    endpoint, use_ssl = s3.duckdb_endpoint()
    bucket = "/".join(str(settings.data_path).split("/")[:3]) + "/"
    parts = [
        "TYPE s3",
        f"KEY_ID {_sql_str(s3.key_id)}",
        f"SECRET {_sql_str(s3.secret.get_secret_value() if s3.secret else '')}",
        f"REGION {_sql_str(s3.region)}",
        f"URL_STYLE {_sql_str(s3.url_style)}",
        f"USE_SSL {'true' if use_ssl else 'false'}",
        f"SCOPE {_sql_str(bucket)}",
    ]
    if endpoint:
        parts.append(f"ENDPOINT {_sql_str(endpoint)}")
    con.execute(f"CREATE OR REPLACE SECRET gptflow_catalog_s3 ({', '.join(parts)})")


def _attach(con: duckdb.DuckDBPyConnection, settings: CatalogSettings, *, read_only: bool) -> None:
    """ATTACH the lake, retrying the race of several processes creating a fresh lake."""
    import duckdb

    assert settings.url is not None and settings.data_path is not None
    options = [f"DATA_PATH {_sql_str(settings.data_path)}"]
    if read_only:
        options.append("READ_ONLY")
    sql = f"ATTACH {_sql_str(settings.url)} AS {LAKE_ALIAS} ({', '.join(options)})"
    deadline = time.monotonic() + settings.lock_timeout
    delay = 0.05
    while True:
        try:
            con.execute(sql)
            return
        except duckdb.Error as exc:
            msg = redact(str(exc))
            if is_conflict(exc) and time.monotonic() < deadline:
                CONFLICT_RETRIES["attach"] += 1
                log.debug(
                    "attaching %s raced another process (%s); retrying", settings.location(), msg
                )
                delay = _backoff(delay, deadline)
                continue
            if "creating a new DuckLake is explicitly disabled" in msg:
                raise CatalogError(
                    f"the DuckLake catalog {settings.location()} has not been created yet; "
                    "run the pipeline (any write creates it) first"
                ) from exc
            if "does not match existing data path" in msg:
                raise CatalogError(
                    f"the DuckLake catalog {redact(settings.url)} keeps its data elsewhere than "
                    f"data_path {settings.data_path}: {msg}. Set GPTFLOW_CATALOG_DATA_PATH / "
                    "catalog.data_path to the path it recorded"
                ) from exc
            raise CatalogError(
                f"cannot attach the DuckLake catalog {settings.location()}: {msg}"
            ) from exc


def new_lake_connection(settings: CatalogSettings, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the extensions loaded and the lake attached (as
    :data:`LAKE_ALIAS`, the default database). The caller owns and closes it."""
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    try:
        load_extension(con, "ducklake")
        kind = settings.metadata_kind
        if kind in ("postgres", "sqlite"):
            load_extension(con, f"{kind}_scanner")
        if settings.on_s3:
            load_extension(con, "httpfs")
            _create_s3_secret(con, settings)
        _attach(con, settings, read_only=read_only)
        con.execute(f"USE {LAKE_ALIAS}")
    except BaseException:
        con.close()
        raise
    return con


def _lake_base(settings: CatalogSettings, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    key = (settings.lake_key(), read_only)
    with _LAKES_GUARD:
        base = _LAKES.get(key)
        if base is None:
            base = new_lake_connection(settings, read_only=read_only)
            _LAKES[key] = base
        return base


@contextlib.contextmanager
def lake_cursor(
    settings: CatalogSettings, *, read_only: bool
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on this process's connection to the lake, with the lake as default."""
    cur = _lake_base(settings, read_only=read_only).cursor()
    try:
        cur.execute(f"USE {LAKE_ALIAS}")
        yield cur
    finally:
        cur.close()


def is_write_refusal(exc: BaseException) -> bool:
    """``exc`` is DuckDB refusing a write on a read-only connection or transaction."""
    import duckdb

    msg = str(exc)
    if isinstance(exc, duckdb.PermissionException):
        return True
    refused = "Cannot execute statement" in msg or "Cannot write to database" in msg
    return bool(_READONLY_RE.search(msg)) and refused


# ---------------------------------------------------------------------- conflicts
class ConflictTimeoutError(CatalogError):
    """A transaction kept losing write conflicts until its time bound ran out."""


def is_conflict(exc: BaseException | None) -> bool:
    """``exc`` (or an exception it was raised from) is a retryable write conflict; an
    exhausted retry (:class:`ConflictTimeoutError`) is not retried again by an outer one."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConflictTimeoutError):
            return False
        if _CONFLICT_RE.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_on_conflict(fn: Callable[[], T], *, timeout: float, what: str, where: str) -> T:
    """Run ``fn`` (one whole transaction), re-running it with jittered exponential backoff
    while it fails with a write conflict; after ``timeout`` seconds (or
    :data:`MAX_ATTEMPTS`) a :class:`CatalogError` says so. Other errors pass through."""
    start = time.monotonic()
    deadline = start + max(0.0, timeout)
    delay = 0.02
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_conflict(exc):
                raise
            if time.monotonic() >= deadline or attempt >= MAX_ATTEMPTS:
                raise ConflictTimeoutError(
                    f"{what} on the catalog {where} kept conflicting with other writers: "
                    f"{attempt} attempts in {time.monotonic() - start:.1f} s; each was rolled "
                    "back, so nothing of it was written. Retry later, or raise "
                    f"GPTFLOW_DB_LOCK_TIMEOUT (now {timeout:g} s). Last error: {redact(str(exc))}"
                ) from exc
            CONFLICT_RETRIES[what] += 1
            log.debug("%s on %s conflicted (attempt %d): %s", what, where, attempt, exc)
            delay = _backoff(delay, deadline)
