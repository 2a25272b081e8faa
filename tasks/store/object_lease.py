"""One computation per stage key across machines: a lease object on the object store.

The object-store backend of the lease protocol (:class:`tasks.store.lease.LeaseBase`, same
interface as the file lease), built on conditional writes only
(:class:`tasks.store.objects.ObjectRoot`), so runs on different machines exclude each other
without a lock server:

- **create**: ``<stage>/<key>.lease`` with ``If-None-Match: *`` — exactly one of
  several creators succeeds; the others wait and poll.
- **renew**: the owner rewrites it every ``ttl_s / 4`` with ``If-Match: <its ETag>``; a
  renewal that fails because the object changed (or is gone) means the lease was taken
  over: its owner stops renewing and :meth:`~tasks.store.lease.LeaseBase.confirm` refuses, so
  it does not publish.
- **age**: measured by the server's clock (its ``Date`` header minus the object's
  ``Last-Modified``), so the machines' clocks do not matter; a waiter that cannot see
  the server's clock breaks a lease whose ETag it saw unchanged for ``ttl_s`` of its own
  time.
- **break**: a take-over — the breaker writes its own lease with
  ``If-Match: <the stale ETag>``, which succeeds for exactly one of several breakers.
- **release**: delete with ``If-Match: <its ETag>`` (never someone else's lease).
"""

from __future__ import annotations

import contextlib

from tasks.store.lease import LeaseBase, LeaseLost, Seen
from tasks.store.objects import Fetched, ObjectRoot

__all__ = ["LeaseLost", "ObjectLease"]


class ObjectLease(LeaseBase):
    """An exclusive, renewed lease object ``rel`` under ``root`` (use :meth:`hold`)."""

    def __init__(
        self,
        root: ObjectRoot,
        rel: str,
        run_id: str,
        *,
        ttl_s: float | None = None,
        poll_s: float | None = None,
    ) -> None:
        super().__init__(run_id, ttl_s=ttl_s, poll_s=poll_s)
        self.root = root
        self.rel = rel
        self.etag: str | None = None
        """The ETag of this holder's lease object as it last wrote it."""

    @property
    def url(self) -> str:
        return self.root.url_of(self.rel)

    @property
    def where(self) -> str:
        return self.url

    def _seen(self, got: Fetched) -> Seen:
        info = self._parse(got.data) or self._unknown(0.0)
        return Seen(info, got.etag, got.age_s)

    def _mine(self, got: Fetched | None) -> bool:
        return got is not None and self._seen(got).info.token == self.token

    def _create(self) -> bool:
        etag = self.root.create(self.rel, self._body())
        if etag is None:
            got = self.root.get(self.rel)
            if not self._mine(got):
                return False
            assert got is not None
            etag = got.etag  # a retried create whose first attempt succeeded
        self.etag = etag
        return True

    def _look(self) -> Seen | None:
        got = self.root.get(self.rel)
        return None if got is None else self._seen(got)

    def _take_over(self, seen: Seen) -> bool:
        etag = self.root.replace_if(self.rel, self._body(), str(seen.version))
        if etag is None:
            return False
        self.etag = etag
        return True

    def _renew(self) -> bool:
        new = self.root.replace_if(self.rel, self._body(), self.etag or "")
        if new is None:
            got = self.root.get(self.rel)
            if not self._mine(got):
                return False  # taken over, or deleted: this run's hold was broken
            assert got is not None
            new = got.etag  # our own write whose answer was lost
        self.etag = new
        return True

    def _holds(self) -> bool:
        return self.etag is not None and self._mine(self.root.get(self.rel))

    def _delete(self) -> None:
        if self.etag is not None and not self.lost:
            # unreachable store: the lease goes stale and is broken after its TTL
            with contextlib.suppress(OSError):
                self.root.delete_if(self.rel, self.etag)
        self.etag = None
