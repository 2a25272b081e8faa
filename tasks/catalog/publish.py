"""Readers never block writers: the DuckDB catalog is two files.

DuckDB lets one process at a time hold a file open for writing, and while any other
process holds it open — a notebook's ``read_only=True`` connection included — no writer
can open it (FACTS §7). So writers and readers never share a file:

* the **live** file (:meth:`~tasks.catalog.settings.CatalogSettings.live_path`,
  ``<path>.live``) is opened by gptflow's writers only, each for one transaction; several
  writer processes take turns on it with the lock retries of ``connections.py``;
* the **published** file (``path``, e.g. ``artifacts/gptflow.duckdb``: what people,
  notebooks and dashboards open) is a checkpointed copy of the live file put in place with
  ``os.replace``. A reader holding the old file keeps reading its snapshot (the old
  inode); a new connection sees the new one; writers never open the published file.

When a publish happens: whenever a writer asks (the run recorder at the start and end of
a run and of every stage, migrations, rebuilds); after a write, when this process last
published :data:`PUBLISH_EVERY` seconds ago or more (so rows written mid-stage, such as
training curves, show up while the stage runs); and when a process that wrote exits with
writes unpublished. A publish copies the whole file, so it happens per stage (and at most
every :data:`PUBLISH_EVERY` seconds in between), not per row.

Anything written into the published file is lost at the next publish; while a connection
holds such writes, its WAL (``<path>.wal``) would be replayed by the next reader onto the
new file, so a publish removes a WAL it finds there (and says so).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

#: Seconds between two publishes triggered by plain writes (forced ones do not wait).
PUBLISH_EVERY = 30.0


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


def copy_file(src: Path, dst: Path) -> None:
    """``dst`` = a copy of ``src``, through ``copy_file_range`` (a reflink, no bytes
    moved, where the file system shares extents: XFS, Btrfs), else a plain copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = os.fstat(fin.fileno()).st_size
        try:
            while left > 0:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), left)
                if done == 0:
                    break
                left -= done
        except (AttributeError, OSError):  # not on this platform / file system
            pass
        if left == 0:
            return
    shutil.copyfile(src, dst)


def publish_copy(con: duckdb.DuckDBPyConnection, live: Path, published: Path) -> None:
    """Checkpoint ``live`` through ``con`` — the caller's open write connection to it,
    which keeps every other writer out until the copy is in place — and replace
    ``published`` with a copy of it (atomically: readers see the old or the new file)."""
    con.execute("CHECKPOINT")
    tmp = published.with_name(f".{published.name}.{os.getpid()}-{threading.get_ident()}.publish")
    try:
        copy_file(live, tmp)
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
        copy_file(published, tmp)
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


__all__ = [
    "PUBLISH_EVERY",
    "needs_publish",
    "note_write",
    "publish_copy",
    "seed_live",
    "unpublished",
    "wal_of",
]
