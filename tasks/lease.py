"""One computation per stage key at a time: a lease object beside the stage folder.

``<stage>/<key>.lease`` is created exclusively by the run that computes the key (on a
local or shared file system ``O_CREAT | O_EXCL`` is atomic, also over NFS v3+), holds
who owns it, and is renewed by a heartbeat thread while the stage runs. Another run
that needs the same key waits until the lease is released, then takes the cache hit
(or, if the first run failed, computes it itself). A lease whose owner stopped renewing
it for ``ttl_s`` — a killed worker, a lost machine — is stale and is broken by renaming
it aside (a rename succeeds for exactly one of several breakers). On the owner's own
host a dead owner process is detected at once.

The lease lives in the artifacts store itself, so it holds across machines that share
that store; no lock server is involved.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds without a renewal after which a lease counts as abandoned.
DEFAULT_TTL_S = float(os.environ.get("GPTFLOW_LEASE_TTL_S", "60"))
#: Seconds between two looks at a lease held by someone else.
DEFAULT_POLL_S = float(os.environ.get("GPTFLOW_LEASE_POLL_S", "1.0"))


@dataclass
class LeaseInfo:
    """What a lease file says about its owner."""

    token: str
    run_id: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    ttl_s: float

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


class WaitTurn:
    """The waiting part of a lease's ``acquire``, one call per look at a live holder:
    tell ``on_wait`` about each new holder once, give up after ``timeout_s``, sleep."""

    def __init__(
        self,
        where: str,
        poll_s: float,
        on_wait: Callable[[LeaseInfo], None] | None,
        timeout_s: float | None,
    ) -> None:
        self.where = where
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.announced: str | None = None

    def __call__(self, info: LeaseInfo) -> None:
        if self.on_wait is not None and self.announced != info.token:
            self.on_wait(info)
            self.announced = info.token
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"lease {self.where} still held by {info.describe()}")
        time.sleep(self.poll_s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive, renewed lease on ``path`` (use :meth:`hold` as a context manager)."""

    def __init__(
        self,
        path: Path,
        run_id: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ file ops
    def _info(self, now: float) -> dict[str, Any]:
        return {
            "token": self.token,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": getattr(self, "_acquired_at", now),
            "renewed_at": now,
            "ttl_s": self.ttl_s,
        }

    def read(self) -> LeaseInfo | None:
        """The current owner, or None when no (readable) lease exists."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return LeaseInfo(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # being written right now (create, then fill): treat as held, fresh
            return LeaseInfo("?", "?", "?", 0, time.time(), time.time(), self.ttl_s)

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._acquired_at = now
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._info(now), f)
        return True

    def _is_stale(self, info: LeaseInfo) -> bool:
        if info.token == "?":
            return False
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return True
        return time.time() - info.renewed_at > info.ttl_s

    def _break(self, info: LeaseInfo) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke or released it first
        current = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            current = LeaseInfo(**json.loads(aside.read_text(encoding="utf-8")))
        if current is not None and current.token != info.token and not self._is_stale(current):
            # we moved a fresh lease taken in between: put it back if the spot is free
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            aside.unlink()
        log.warning("broke the stale lease %s of %s", self.path, info.describe())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            tmp = self.path.with_name(f"{self.path.name}.renew-{self.token[:8]}")
            try:
                info = self.read()
                if info is None:  # moved aside for a moment by a breaker: take it back
                    self._try_create()
                    continue
                if info.token != self.token:
                    log.error("lease %s was taken from this run; stopping renewals", self.path)
                    return
                tmp.write_text(json.dumps(self._info(time.time())), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as exc:  # a transient storage error: try again next beat
                log.warning("could not renew lease %s: %s", self.path, exc)

    # ------------------------------------------------------------------ public
    def acquire(
        self,
        *,
        on_wait: Callable[[LeaseInfo], None] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """Take the lease, waiting while someone else holds it. Returns True when the
        caller had to wait (so it should look for the other run's result first)."""
        waited = False
        wait = WaitTurn(str(self.path), self.poll_s, on_wait, timeout_s)
        while not self._try_create():
            info = self.read()
            if info is None:
                continue
            if self._is_stale(info):
                self._break(info)
                continue
            waited = True
            wait(info)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._thread.start()
        return waited

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        info = self.read()
        if info is not None and info.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @contextlib.contextmanager
    def hold(self, on_wait: Callable[[LeaseInfo], None] | None = None) -> Iterator[bool]:
        """``with lease.hold() as waited:`` — held for the block, released after."""
        waited = self.acquire(on_wait=on_wait)
        try:
            yield waited
        finally:
            self.release()
