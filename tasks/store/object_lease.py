"""The object-store backend of the lease protocol (:class:`tasks.store.lease.LeaseBase`).

Built on conditional writes only (:class:`tasks.store.objects.ObjectRoot`): create with
``If-None-Match: *``, renew, take over and release with ``If-Match: <ETag>``; a lease's
age is measured by the server's clock (docs/several-machines.md).
"""

from __future__ import annotations

import contextlib

from tasks.store.lease import LeaseBase, Seen
from tasks.store.objects import Fetched, ObjectRoot


class ObjectLease(LeaseBase):
    """An exclusive, renewed lease object ``rel`` under ``root`` (use :meth:`hold`)."""

    def __init__(self, root: ObjectRoot, rel: str, run_id: str, **timing: float | None) -> None:
        super().__init__(run_id, **timing)
        self.root = root
        self.rel = rel
        self.etag: str | None = None
        """The ETag of this holder's lease object as it last wrote it."""

    @property
    def where(self) -> str:
        return self.root.url_of(self.rel)

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
