"""Readers never block writers: the DuckDB catalog is two files.

DuckDB lets no writer open a file another process holds open, even read-only
(FACTS §7). So gptflow's writers write the **live** file (``<path>.live``, one
transaction at a time) and publish a checkpointed copy of it over the **published**
file (``path``, what people open) with ``os.replace``: when a writer asks (run starts and
ends, migrations, rebuilds), at most every :data:`PUBLISH_GAP` seconds for stage events
(a later event's publish waits for the gap, so a burst of them — a cached rerun's — makes
one copy, not one each), after a write when the last publish is :data:`PUBLISH_EVERY`
seconds old, and at exit. Writes made into the published file are
lost at the next publish, which removes a WAL it finds there (docs/catalog.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.catalog.connections import keep_fd_with, pooled_connections, pooled_depth

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

#: Seconds between two publishes triggered by plain writes (forced ones do not wait).
PUBLISH_EVERY = 30.0
#: Seconds between two publishes asked for by run and stage events.
PUBLISH_GAP = 1.0


def wal_of(path: Path) -> Path:
    """The write-ahead log DuckDB keeps beside the database file ``path``."""
    return path.with_name(path.name + ".wal")


@dataclass
class _State:
    """What this process knows about publishing one live file."""

    published: Path
    last: float = -math.inf
    """``time.monotonic()`` of this process's last publish."""
    dirty: bool = False
    """This process wrote since its last publish."""
    timer: threading.Timer | None = None
    """A publish waiting for :data:`PUBLISH_GAP` to pass."""
    pending: Callable[[], object] | None = None
    """What that timer calls."""


_STATES: dict[Path, _State] = {}
_GUARD = threading.Lock()


def _after_fork_in_child() -> None:
    global _GUARD
    _GUARD = threading.Lock()
    _STATES.clear()  # the parent publishes its own writes


os.register_at_fork(after_in_child=_after_fork_in_child)


def _state(live: Path, published: Path) -> _State:
    with _GUARD:
        return _STATES.setdefault(live, _State(published))


def note_write(live: Path, published: Path) -> bool:
    """Record that this process committed a write to ``live``; True when a publish is
    due now (the last one is :data:`PUBLISH_EVERY` seconds old or more)."""
    st = _state(live, published)
    st.dirty = True
    return time.monotonic() - st.last >= PUBLISH_EVERY


def due_or_deferred(live: Path, published: Path, publish: Callable[[], object]) -> bool:
    """True when this process last published :data:`PUBLISH_GAP` seconds ago or more
    (publish now); else ``publish`` is scheduled for when that is (once) and False."""
    st = _state(live, published)
    wait = st.last + PUBLISH_GAP - time.monotonic()
    if wait <= 0:
        return True

    def fire() -> None:
        with _GUARD:
            if st.pending is not fire:
                return  # made already (publish_deferred)
            st.timer = st.pending = None  # an event during this publish schedules the next
        publish()

    with _GUARD:
        if st.timer is None:
            st.timer, st.pending = threading.Timer(wait, fire), fire
            st.timer.daemon = True
            st.timer.start()
    return False


def publish_deferred() -> None:
    """Make every publish still waiting for its gap now (at a run's end)."""
    with _GUARD:
        waiting = [(st.timer, st.pending) for st in _STATES.values() if st.pending is not None]
    for timer, pending in waiting:
        if timer is not None:
            timer.cancel()
        if pending is not None:
            pending()


def unpublished() -> list[tuple[Path, Path]]:
    """``(live, published)`` of every file this process wrote and has not published."""
    with _GUARD:
        return [(live, st.published) for live, st in _STATES.items() if st.dirty]


def needs_publish(live: Path, published: Path) -> bool:
    """The live file holds changes the published file lacks (written by any process):
    there is no published file, the live file has a WAL (writes not yet checkpointed), or
    it was modified since the published copy was made."""
    try:
        live_mtime = live.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    if wal_of(live).exists():
        return True
    try:
        return live_mtime >= published.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def copy_fd(src: int, dst: Path) -> None:
    """``dst`` = a copy of the open file ``src`` (its offset untouched), through
    ``copy_file_range`` (a reflink, no bytes moved, where the file system shares extents:
    XFS, Btrfs), else by reading it."""
    size = os.fstat(src).st_size
    with open(dst, "wb") as fout:
        pos = 0
        try:
            while pos < size:
                done = os.copy_file_range(src, fout.fileno(), size - pos, pos)
                if done == 0:
                    break
                pos += done
        except (AttributeError, OSError):  # not on this platform / file system
            pass
        while pos < size:
            chunk = os.pread(src, min(1 << 22, size - pos), pos)
            if not chunk:
                break
            fout.write(chunk)
            pos += len(chunk)


def publish_copy(con: duckdb.DuckDBPyConnection, live: Path, published: Path) -> None:
    """Checkpoint ``live`` through ``con`` — the caller's open write connection to it,
    which keeps every other writer out until the copy is in place — and replace
    ``published`` with a copy of it (atomically: readers see the old or the new file)."""

    con.execute("CHECKPOINT")
    tmp = published.with_name(f".{published.name}.{os.getpid()}-{threading.get_ident()}.publish")
    # closing a descriptor of the live file would drop DuckDB's lock on it while ``con``
    # is still open: the descriptor is closed after ``con``
    fd = os.open(live, os.O_RDONLY)
    keep_fd_with(con, fd)
    try:
        copy_fd(fd, tmp)
        stray = wal_of(published)
        if stray.exists():
            log.warning(
                "%s was written to directly (a read-write connection, e.g. a notebook, wrote "
                "into the published catalog): those writes are discarded by this publish. "
                "Open the published file with read_only=True; write through gptflow",
                published,
            )
            stray.unlink(missing_ok=True)
        os.replace(tmp, published)
    finally:
        tmp.unlink(missing_ok=True)
    st = _state(live, published)
    st.last = time.monotonic()
    st.dirty = False


def seed_live(live: Path, published: Path) -> None:
    """Create the live file from the published one when only that exists (a catalog
    written by an older gptflow, or whose live file was deleted): a checkpointed copy
    (its WAL, if any, replayed), linked in place only if no other process did first."""
    import duckdb

    if live.exists() or not published.exists():
        return
    tmp = live.with_name(f".{live.name}.{os.getpid()}-{threading.get_ident()}.seed")
    try:
        fd = os.open(published, os.O_RDONLY)
        try:
            copy_fd(fd, tmp)
        finally:
            os.close(fd)
        if wal_of(published).exists():  # writes an older writer did not checkpoint
            shutil.copyfile(wal_of(published), wal_of(tmp))
        duckdb.connect(str(tmp)).close()  # replays and checkpoints the WAL
        try:
            os.link(tmp, live)
        except FileExistsError:
            return  # another writer seeded it first: theirs is the same data
        except OSError:  # a file system without hard links
            if live.exists():
                return
            os.replace(tmp, live)
        log.info("catalog %s: live file %s created from it", published, live)
    finally:
        tmp.unlink(missing_ok=True)
        wal_of(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def catalog_session() -> Iterator[None]:
    """A run's catalog session: for the ``with`` block this process keeps one write
    connection to a catalog file between operations
    (:func:`~tasks.catalog.connections.pooled_connections`); at its end a publish still
    waiting for its gap is made at once, through that connection."""
    with pooled_connections():
        try:
            yield
        finally:
            if pooled_depth() == 1:
                publish_deferred()
