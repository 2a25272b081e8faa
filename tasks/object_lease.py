"""One computation per stage key across machines: a lease object on the object store.

The object-store counterpart of :class:`tasks.lease.Lease` (same interface), built on
conditional writes only (:class:`tasks.storage.ObjectRoot`), so runs on different
machines exclude each other without a lock server:

- **acquire**: create ``<stage>/<key>.lease`` with ``If-None-Match: *`` — exactly one of
  several creators succeeds; the others wait and poll.
- **renew**: the owner rewrites it every ``ttl_s / 4`` with ``If-Match: <its ETag>``; a
  renewal that fails because the object changed means the lease was taken over (its
  owner stops renewing and :meth:`ObjectLease.confirm` fails, so it does not publish).
- **break**: a lease not rewritten for longer than its ``ttl_s`` is stale. Age is measured
  by the server's clock (its ``Date`` header minus the object's ``Last-Modified``), so
  the machines' clocks do not matter; a waiter that cannot see the server's clock breaks
  a lease whose ETag it saw unchanged for ``ttl_s`` of its own time. On the owner's host
  a dead owner process is detected at once. Breaking is a take-over: the breaker writes
  its own lease with ``If-Match: <the stale ETag>``, which succeeds for exactly one of
  several breakers.
- **release**: delete with ``If-Match: <its ETag>`` (never someone else's lease).
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
from typing import Any

from gpt.errors import GPTFlowError
from tasks.lease import DEFAULT_POLL_S, DEFAULT_TTL_S, LeaseInfo, WaitTurn, _pid_alive
from tasks.storage import Fetched, ObjectRoot

log = logging.getLogger(__name__)


class LeaseLost(GPTFlowError):
    """This run's lease was taken over (it stalled past its TTL): it must not publish."""


class ObjectLease:
    """An exclusive, renewed lease object ``rel`` under ``root`` (use :meth:`hold`)."""

    def __init__(
        self,
        root: ObjectRoot,
        rel: str,
        run_id: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.root = root
        self.rel = rel
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.root.url_of(self.rel)

    # ------------------------------------------------------------------ objects
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

    def _parse(self, got: Fetched) -> LeaseInfo:
        try:
            data: dict[str, Any] = json.loads(got.data)
            return LeaseInfo(**data)
        except (ValueError, TypeError):  # not ours to read: held, fresh, by the default TTL
            return LeaseInfo("?", "?", "?", 0, time.time(), time.time(), self.ttl_s)

    def read(self) -> LeaseInfo | None:
        """The current owner, or None when no lease exists."""
        got = self.root.get(self.rel)
        return None if got is None else self._parse(got)

    def _is_stale(self, info: LeaseInfo, got: Fetched, seen_since: float) -> bool:
        if info.host == socket.gethostname() and info.pid and not _pid_alive(info.pid):
            return True
        if got.age_s is not None:
            return got.age_s > info.ttl_s
        return time.monotonic() - seen_since > info.ttl_s

    def _won(self, etag: str) -> None:
        self.etag = etag
        self.lost = False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                new = self.root.replace_if(self.rel, self._body(), self.etag or "")
                if new is not None:
                    self.etag = new
                    continue
                got = self.root.get(self.rel)
                if got is not None and self._parse(got).token == self.token:
                    self.etag = got.etag  # our own write whose answer was lost
                    continue
                if got is None and self._take(self.root.create(self.rel, self._body())):
                    continue
                self.lost = True
                log.error("lease %s was taken from this run; stopping renewals", self.url)
                return
            except OSError as exc:  # a transient storage error: try again next beat
                log.warning("could not renew lease %s: %s", self.url, exc)

    def _take(self, etag: str | None) -> bool:
        if etag is None:
            return False
        self._won(etag)
        return True

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
        wait = WaitTurn(self.url, self.poll_s, on_wait, timeout_s)
        seen: tuple[str, float] | None = None  # (etag, first seen) for clockless staleness
        self._acquired_at = time.time()
        while True:
            if self._take(self.root.create(self.rel, self._body())):
                break
            got = self.root.get(self.rel)
            if got is None:
                continue  # released in between: try again
            info = self._parse(got)
            if info.token == self.token:  # a retried create whose first attempt succeeded
                self._won(got.etag)
                break
            if seen is None or seen[0] != got.etag:
                seen = (got.etag, time.monotonic())
            if self._is_stale(info, got, seen[1]):
                if self._take(self.root.replace_if(self.rel, self._body(), got.etag)):
                    log.warning("broke the stale lease %s of %s", self.url, info.describe())
                    waited = True
                    break
                continue  # another breaker (or a late renewal) won: look again
            waited = True
            wait(info)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._thread.start()
        return waited

    def confirm(self) -> None:
        """Raise :class:`LeaseLost` unless the lease object is still this run's."""
        got = self.root.get(self.rel)
        if self.lost or got is None or self._parse(got).token != self.token:
            holder = "nobody" if got is None else self._parse(got).describe()
            raise LeaseLost(
                f"the lease {self.url} is no longer this run's (now held by {holder}); this "
                "run stalled past the lease TTL (GPTFLOW_LEASE_TTL_S) and must not publish"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.etag is not None and not self.lost:
            with contextlib.suppress(OSError):
                self.root.delete_if(self.rel, self.etag)
        self.etag = None

    @contextlib.contextmanager
    def hold(self, on_wait: Callable[[LeaseInfo], None] | None = None) -> Iterator[bool]:
        """``with lease.hold() as waited:`` — held for the block, released after."""
        waited = self.acquire(on_wait=on_wait)
        try:
            yield waited
        finally:
            self.release()
