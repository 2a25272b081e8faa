"""Opening the catalog: the DuckDB file (lock retries) or a DuckLake (extensions, S3
secret, ATTACH), and retrying the write conflicts several writers cause.

* **DuckDB file.** One process at a time may hold the file open, and while a writer holds
  it even read-only opens from other processes fail (FACTS.md §7). So writers write a file
  of their own (the live file; readers get published copies: ``publish.py``), every
  operation opens the file, runs one transaction and closes it, and opening is retried
  with jittered backoff on the lock error for ``lock_timeout`` seconds. Inside
  :func:`pooled_connections` (a pipeline run's catalog session) the process keeps its write connection to the
  live file between operations instead (reads run in ``BEGIN TRANSACTION READ ONLY``):
  a cached rerun's ~70 operations open the file once. It is closed after
  :data:`IDLE_CLOSE_S` idle, and after the operation in progress as soon as another
  process says it waits for the file (it touches ``<live>.waiting`` while retrying).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gpt.errors import CatalogError, CatalogLockedError
from tasks.catalog.extensions import load_extension
from tasks.catalog.settings import CatalogSettings, redact
from tasks.catalog.values import sql_str

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
    global _LAKES_GUARD, _PROCESS_LOCKS_GUARD, _POOL_GUARD, _SESSIONS
    _INHERITED.extend(_LAKES.values())
    _INHERITED.extend(_IN_USE)  # a connection another thread used at the fork: the parent's
    _IN_USE.clear()
    _POOL_GUARD = threading.Lock()
    _SESSIONS = 0
    _LAKES.clear()
    _LAKES_GUARD = threading.Lock()  # another thread of the parent may have held these
    _PROCESS_LOCKS_GUARD = threading.Lock()
    _PROCESS_LOCKS.clear()


os.register_at_fork(before=lambda: close_idle(), after_in_child=_after_fork_in_child)


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
def open_file(
    path: Path, *, read_only: bool, timeout: float, config: dict[str, Any] | None = None
) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` retried with jittered exponential backoff on the lock error."""
    import duckdb

    deadline = time.monotonic() + max(0.0, timeout)
    delay = 0.02
    waited = False
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as exc:
            msg = str(exc)
            if not _LOCK_RE.search(msg):
                if read_only and "does not exist" in msg:
                    raise missing_catalog(path) from exc
                raise CatalogError(f"cannot open the catalog {path}: {msg}") from exc
            with contextlib.suppress(OSError):
                waiting_marker(path).touch()  # holders close their connection for us
            waited = True
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
            continue
        if waited:
            with contextlib.suppress(OSError):
                waiting_marker(path).unlink()
        return con


def missing_catalog(path: Path | None) -> CatalogError:
    """The error for reading a catalog file that does not exist."""
    return CatalogError(
        f"the catalog {path} does not exist yet; run the pipeline first "
        "(e.g. `gptflow run`) or point --db / GPTFLOW_DB at an existing file"
    )


def waiting_marker(path: Path) -> Path:
    """The file a process touches while it waits for ``path`` to be free."""
    return path.with_name(path.name + ".waiting")


def _someone_waits(path: Path) -> bool:
    """Another process touched the waiting marker of ``path`` in the last
    :data:`WAIT_FRESH_S` seconds."""
    try:
        mtime = waiting_marker(path).stat().st_mtime
    except OSError:
        return False
    return time.time() - mtime < WAIT_FRESH_S


# ---------------------------------------------------------------------- the run's connection
#: Seconds a pooled write connection stays open, idle, before it is closed.
IDLE_CLOSE_S = 0.5
#: A waiting marker touched this recently makes holders close after their operation.
WAIT_FRESH_S = 2.0

# live file -> (its idle connection, the timer that closes it); in use: taken out
_IDLE: dict[str, tuple[duckdb.DuckDBPyConnection, threading.Timer]] = {}
# connections lent to an operation now (closed, not parked, when no session is left)
_IN_USE: list[duckdb.DuckDBPyConnection] = []
_POOL_GUARD = threading.Lock()
_SESSIONS = 0
# open descriptors of the live file that must outlive the connection: closing any
# descriptor of a file drops every POSIX lock this process holds on it (DuckDB's lock)
_KEEP_FDS: dict[int, list[int]] = {}


@contextlib.contextmanager
def pooled_connections() -> Iterator[None]:
    """For the ``with`` block (a pipeline run), keep this process's write connection to
    a catalog file open between operations (see the module's docstring); at its end every
    idle connection is closed."""
    global _SESSIONS
    with _POOL_GUARD:
        _SESSIONS += 1
    try:
        yield
    finally:
        with _POOL_GUARD:
            _SESSIONS -= 1
            last = _SESSIONS == 0
        if last:
            close_idle()


def pooled_depth() -> int:
    """How many :func:`pooled_connections` blocks are open in this process (connections
    are pooled while there is one)."""
    return _SESSIONS


def keep_fd_with(con: duckdb.DuckDBPyConnection, fd: int) -> None:
    """Close ``fd`` (a descriptor of the file ``con`` holds) only after ``con``."""
    _KEEP_FDS.setdefault(id(con), []).append(fd)


def close_connection(con: duckdb.DuckDBPyConnection) -> None:
    """Close ``con``, then the descriptors kept with it (:func:`keep_fd_with`)."""
    try:
        con.close()
    finally:
        for fd in _KEEP_FDS.pop(id(con), []):
            with contextlib.suppress(OSError):
                os.close(fd)


def take_pooled(path: Path, timeout: float) -> duckdb.DuckDBPyConnection:
    """The process's write connection to ``path``: the idle one, else a new one (the
    caller holds the catalog's process lock and gives it back with :func:`give_back`)."""
    with _POOL_GUARD:
        parked = _IDLE.pop(str(path), None)
    if parked is not None:
        parked[1].cancel()
        con = parked[0]
    else:
        con = open_file(path, read_only=False, timeout=timeout)
    with _POOL_GUARD:
        _IN_USE.append(con)
    return con


def give_back(path: Path, con: duckdb.DuckDBPyConnection) -> None:
    """End an operation on a pooled connection: its open transaction is rolled back; it
    is kept idle for the next one, unless the session ended or another process waits for
    the file, when it is closed."""
    import duckdb

    with _POOL_GUARD, contextlib.suppress(ValueError):
        _IN_USE.remove(con)
    try:
        con.execute("ROLLBACK")  # what a failed operation left open
    except duckdb.TransactionException:
        pass  # none was open
    except Exception:
        close_connection(con)
        return
    if not _SESSIONS or _someone_waits(path):
        close_connection(con)
        return
    timer = threading.Timer(IDLE_CLOSE_S, _expire, args=(str(path), con))
    timer.daemon = True
    with _POOL_GUARD:
        previous = _IDLE.pop(str(path), None)
        _IDLE[str(path)] = (con, timer)
    if previous is not None:
        previous[1].cancel()
        close_connection(previous[0])
    timer.start()


def _expire(key: str, con: duckdb.DuckDBPyConnection) -> None:
    with _POOL_GUARD:
        parked = _IDLE.get(key)
        if parked is None or parked[0] is not con:
            return  # taken again (or replaced) since
        del _IDLE[key]
    with contextlib.suppress(Exception):
        close_connection(con)


def close_idle(path: Path | None = None) -> None:
    """Close the idle pooled connection of ``path`` (all of them when None) now: before a
    fork, at a session's end, and wherever the file is to be free or replaced."""
    with _POOL_GUARD:
        keys = [k for k in _IDLE if path is None or k == str(path)]
        parked = [_IDLE.pop(k) for k in keys]
    for con, timer in parked:
        timer.cancel()
        with contextlib.suppress(Exception):
            close_connection(con)


atexit.register(close_idle)


# ---------------------------------------------------------------------- DuckLake
def _create_s3_secret(con: duckdb.DuckDBPyConnection, settings: CatalogSettings) -> None:
    s3 = settings.s3
    if s3.key_id is None:
        return
    endpoint, use_ssl = s3.duckdb_endpoint()
    bucket = "/".join(str(settings.data_path).split("/")[:3]) + "/"
    parts = [
        "TYPE s3",
        f"KEY_ID {sql_str(s3.key_id)}",
        f"SECRET {sql_str(s3.secret.get_secret_value() if s3.secret else '')}",
        f"REGION {sql_str(s3.region)}",
        f"URL_STYLE {sql_str(s3.url_style)}",
        f"USE_SSL {'true' if use_ssl else 'false'}",
        f"SCOPE {sql_str(bucket)}",
    ]
    if endpoint:
        parts.append(f"ENDPOINT {sql_str(endpoint)}")
    con.execute(f"CREATE OR REPLACE SECRET gptflow_catalog_s3 ({', '.join(parts)})")


def _attach(con: duckdb.DuckDBPyConnection, settings: CatalogSettings, *, read_only: bool) -> None:
    """ATTACH the lake, retrying the race of several processes creating a fresh lake."""
    import duckdb

    assert settings.url is not None and settings.data_path is not None
    options = [f"DATA_PATH {sql_str(settings.data_path)}"]
    if read_only:
        options.append("READ_ONLY")
    sql = f"ATTACH {sql_str(settings.url)} AS {LAKE_ALIAS} ({', '.join(options)})"
    where = settings.location()
    try:
        retry_on_conflict(
            lambda: con.execute(sql), timeout=settings.lock_timeout, what="attach", where=where
        )
    except duckdb.Error as exc:
        msg = redact(str(exc))
        if "creating a new DuckLake is explicitly disabled" in msg:
            raise CatalogError(
                f"the DuckLake catalog {where} has not been created yet; "
                "run the pipeline (any write creates it) first"
            ) from exc
        if "does not match existing data path" in msg:
            raise CatalogError(
                f"the DuckLake catalog {redact(settings.url)} keeps its data elsewhere than "
                f"data_path {settings.data_path}: {msg}. Set GPTFLOW_CATALOG_DATA_PATH / "
                "catalog.data_path to the path it recorded"
            ) from exc
        raise CatalogError(f"cannot attach the DuckLake catalog {where}: {msg}") from exc


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
            log.debug(
                "%s on %s conflicted (attempt %d): %s", what, where, attempt, redact(str(exc))
            )
            delay = _backoff(delay, deadline)
