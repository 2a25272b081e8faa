"""Leases: one computation per stage key, and one writer per downloaded file, at a time.

A lease is a small object beside what it guards (``<stage>/<key>.lease``,
``<file>.lease``) naming its owner, who renews it every ``ttl_s / 4``; one not renewed
for ``ttl_s``, or whose owner process is gone on this host, is broken. Every change is
a compare-and-swap on the version its writer saw last, so a stalled owner finds out at
its next renewal and :meth:`LeaseBase.confirm` refuses it before it publishes.
:class:`LeaseBase` is the protocol; :class:`Lease` its file backend (``O_EXCL``, the
owner's own inode renewed in place) and :class:`tasks.store.object_lease.ObjectLease`
its object backend. Why not Prefect's concurrency limits: docs/caching.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.errors import GPTFlowError
from tasks.records.run_state import process_alive

log = logging.getLogger(__name__)

#: Environment variables of the seconds without a renewal after which a lease counts as
#: abandoned (default 60), and of the seconds between two looks at a lease held by
#: someone else (default 1).
TTL_ENV, POLL_ENV = "GPTFLOW_LEASE_TTL_S", "GPTFLOW_LEASE_POLL_S"


class LeaseLost(GPTFlowError):
    """This run's lease was taken over (it stalled past its TTL): it must not publish."""


@dataclass
class LeaseInfo:
    """What a lease says about its owner."""

    token: str
    run_id: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    ttl_s: float

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


@dataclass(frozen=True)
class Seen:
    """One look at a lease: its owner, the version a compare-and-swap compares against,
    and its age (seconds since its last write) where the store can tell it."""

    info: LeaseInfo
    version: Hashable
    age_s: float | None


class LeaseBase(ABC):
    """The lease protocol; a backend supplies the conditional operations (the methods
    starting with ``_`` that are abstract here). Use :meth:`hold` as a context manager,
    or :meth:`acquire` / :meth:`release`."""

    def __init__(
        self, run_id: str, *, ttl_s: float | None = None, poll_s: float | None = None
    ) -> None:
        self.run_id = run_id
        self.ttl_s = float(os.environ.get(TTL_ENV, "60")) if ttl_s is None else ttl_s
        self.poll_s = float(os.environ.get(POLL_ENV, "1.0")) if poll_s is None else poll_s
        self.token = uuid.uuid4().hex
        self.lost = False
        """True once a renewal found the lease taken over (the owner stalled past its
        TTL); :meth:`confirm` then refuses."""
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        """A short name of this holder (its token's first 16 hex digits), e.g. for the
        work folder only this holder uses."""
        return self.token[:16]

    # ------------------------------------------------------------------ backend
    @property
    @abstractmethod
    def where(self) -> str:
        """The lease's path or URL, for messages."""

    @abstractmethod
    def _create(self) -> bool:
        """Create this holder's lease only if none exists; True when it did."""

    @abstractmethod
    def _look(self) -> Seen | None:
        """The lease as it is now, or None when there is none."""

    @abstractmethod
    def _take_over(self, seen: Seen) -> bool:
        """Replace the stale lease ``seen`` by this holder's, only if it is still that
        very version (one of several breakers wins); True when this holder has it."""

    @abstractmethod
    def _renew(self) -> bool:
        """Rewrite this holder's lease only if it is still this holder's; False when it
        was taken over. Raises OSError when the store could not be reached."""

    @abstractmethod
    def _holds(self) -> bool:
        """Whether the lease is this holder's right now."""

    @abstractmethod
    def _delete(self) -> None:
        """Remove the lease only if it is still this holder's; free any local handle."""

    # ------------------------------------------------------------------ shared
    def _body(self) -> bytes:
        now = time.time()
        info = {
            "token": self.token,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": self._acquired_at or now,
            "renewed_at": now,
            "ttl_s": self.ttl_s,
        }
        return json.dumps(info).encode()

    def _parse(self, data: bytes) -> LeaseInfo | None:
        """The owner a lease's bytes name; None when they do not parse (being written,
        or a torn write): such a lease is judged by its age against this TTL."""
        try:
            fields: dict[str, Any] = json.loads(data)
            return LeaseInfo(**fields)
        except (ValueError, TypeError):
            return None

    def _unknown(self, written_at: float) -> LeaseInfo:
        return LeaseInfo("?", "?", "?", 0, written_at, written_at, self.ttl_s)

    def read(self) -> LeaseInfo | None:
        """The current owner, or None when no lease exists."""
        seen = self._look()
        return None if seen is None else seen.info

    def _is_stale(self, seen: Seen, seen_since: float) -> bool:
        """Abandoned: its owner process is gone (on this host), or it was not rewritten
        for its TTL (by the store's clock where it has one, else since this waiter first
        saw this version)."""
        info = seen.info
        if info.host == socket.gethostname() and info.pid and not process_alive(info.pid):
            return True
        age = seen.age_s if seen.age_s is not None else time.monotonic() - seen_since
        return age > info.ttl_s

    def acquire(
        self,
        *,
        on_wait: Callable[[LeaseInfo], None] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """Take the lease, waiting while someone else holds it and breaking it once it
        is stale. Returns True when another run held it meanwhile (so the caller should
        look for that run's result first)."""
        waited = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        announced: str | None = None  # the holder on_wait was told about
        first_seen: tuple[Hashable, float] | None = None  # for stores without a clock
        self.lost = False
        self._acquired_at = time.time()
        while not self._create():
            seen = self._look()
            if seen is None:
                continue  # released in between: try again
            if first_seen is None or first_seen[0] != seen.version:
                first_seen = (seen.version, time.monotonic())
            if self._is_stale(seen, first_seen[1]):
                if self._take_over(seen):
                    log.warning("broke the stale lease %s of %s", self.where, seen.info.describe())
                    waited = True
                    break
                continue  # another breaker (or a late renewal) won: look again
            waited = True
            if on_wait is not None and announced != seen.info.token:
                on_wait(seen.info)
                announced = seen.info.token
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"lease {self.where} still held by {seen.info.describe()}")
            time.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._thread.start()
        return waited

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._renew():
                    continue
            except OSError as exc:  # a transient storage error: try again next beat
                log.warning("could not renew lease %s: %s", self.where, exc)
                continue
            self.lost = True
            log.error("lease %s was taken from this run; stopping renewals", self.where)
            return

    def confirm(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is still this holder's."""
        if self.lost or not self._holds():
            seen = self._look()
            holder = "nobody" if seen is None else seen.info.describe()
            raise LeaseLost(
                f"the lease {self.where} is no longer this run's (now held by {holder}); "
                f"this run stalled past the lease TTL ({TTL_ENV}) and must not publish"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._delete()

    @contextlib.contextmanager
    def hold(self, on_wait: Callable[[LeaseInfo], None] | None = None) -> Iterator[bool]:
        """``with lease.hold() as waited:`` — held for the block, released after."""
        waited = self.acquire(on_wait=on_wait)
        try:
            yield waited
        finally:
            self.release()


class Lease(LeaseBase):
    """A lease file ``path`` on a local or shared file system (module docstring)."""

    def __init__(self, path: Path, run_id: str, **timing: float | None) -> None:
        super().__init__(run_id, **timing)
        self.path = Path(path)
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._size = 0

    @property
    def where(self) -> str:
        return str(self.path)

    def _write(self, data: bytes) -> None:
        """Rewrite this holder's own lease file in place (padded, never shorter, so a
        reader sees the old bytes, the new ones, or a torn mix it cannot parse)."""
        assert self._fd is not None
        self._size = max(self._size, len(data))
        os.pwrite(self._fd, data.ljust(self._size), 0)

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        st = os.fstat(fd)
        self._fd, self._inode, self._size = fd, (st.st_dev, st.st_ino), 0
        self._write(self._body())
        return True

    def _seen(self, path: Path) -> Seen | None:
        """One consistent look at the file ``path`` (stat and bytes of one open file)."""
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None
        info = self._parse(data) or self._unknown(st.st_mtime)
        return Seen(info, (st.st_dev, st.st_ino, data), time.time() - info.renewed_at)

    def _look(self) -> Seen | None:
        return self._seen(self.path)

    def _take_over(self, seen: Seen) -> bool:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # someone else broke or released it first
        try:
            moved = self._seen(aside)
            if moved is None or moved.version != seen.version:
                # not the version judged stale (renewed, or a fresh lease taken in
                # between): put it back if the name is still free
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                return False
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()
        return self._create()

    def _holds(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return self._fd is not None and (st.st_dev, st.st_ino) == self._inode

    def _renew(self) -> bool:
        if self._fd is None:
            return False
        self._write(self._body())  # this holder's own inode: never someone else's lease
        for _ in range(3):  # a breaker may have it aside for a moment, checking it
            if self._holds():
                return True
            time.sleep(0.02)
        return False

    def _delete(self) -> None:
        try:
            if self._holds():
                aside = self.path.with_name(f"{self.path.name}.released-{self.owner}")
                os.rename(self.path, aside)
                st = os.stat(aside)
                if (st.st_dev, st.st_ino) != self._inode:  # taken in between: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, self.path)
                aside.unlink()
        except FileNotFoundError:
            pass
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = self._inode = None


def file_leases(run_id: str) -> Callable[[Path], AbstractContextManager[bool]]:
    """Per-file leases for the downloader (``lease=`` of
    :func:`gpt.data.download.download_sources`): ``<file>.lease`` beside each file,
    held while that file is fetched, so two runs never write one ``.part`` file."""

    def lease(path: Path) -> AbstractContextManager[bool]:
        return Lease(path.with_name(path.name + ".lease"), run_id).hold()

    return lease
