"""Stage folders on object storage, used through verified local copies.

Stages compute in a local folder, so for an object-store root a stage folder is
published at ``<root>/stages/<stage>/<key>/`` and kept as a verified local copy under
:func:`gpt.paths.remote_cache_dir`. A commit uploads the files, records their ETags and
publishes ``manifest.json`` last (``If-None-Match: *``); a lookup checks the listing
against the manifest and downloads into a fresh folder when the local copy differs
(docs/several-machines.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt.fileio import sha256_file
from gpt.paths import remote_cache_dir
from tasks.store.folder import Committed, StageStore, install
from tasks.store.lease import LeaseBase
from tasks.store.manifest import (
    MANIFEST,
    PRODUCED,
    ROWS_DIR,
    Verify,
    complete,
    describe_files,
    history_name,
    history_text,
    manifest_texts,
    parse_history,
    parse_manifest,
    read_manifest,
    verify_files,
    write_manifest,
)
from tasks.store.object_lease import ObjectLease
from tasks.store.objects import Entry, ObjectRoot, StorageError


def remote_problem(
    url: str, listing: dict[str, Entry], files: dict[str, dict[str, Any]]
) -> str | None:
    """None when the published objects match the manifest's files (present, same size,
    same ETag when recorded, nothing else), else the first problem in words."""
    for rel, meta in sorted(files.items()):
        entry = listing.get(rel)
        if entry is None:
            return f"{url}/{rel} is missing"
        if entry.size != meta["bytes"]:
            return f"{url}/{rel} has {entry.size} bytes, the manifest says {meta['bytes']}"
        if meta.get("etag") and entry.etag != meta["etag"]:
            return f"{url}/{rel} was changed after it was published (ETag differs)"
    extra = sorted(set(listing) - set(files) - {MANIFEST, PRODUCED})
    if extra:
        return f"{url}/{extra[0]} is not in the manifest"
    return None


class ObjectStageStore(StageStore):
    """Stage folders published under ``<url>/stages`` (module docstring). ``root`` is the
    local side: the work folders and verified copies."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        super().__init__(remote_cache_dir(self.url) / "stages")
        self.remote = ObjectRoot(f"{self.url}/stages")

    # ------------------------------------------------------------------ names
    def published(self, stage: str, key: str) -> str:
        """The URL of the published folder."""
        return self.remote.url_of(f"{stage}/{key}")

    def lease(self, stage: str, key: str, run_id: str) -> ObjectLease:
        return ObjectLease(self.remote, f"{stage}/{key}.lease", run_id)

    # ------------------------------------------------------------------ reading
    def _read_published(self, rel: str) -> dict[str, Any] | None:
        """The full manifest published at ``rel`` (its ``manifest.json`` and
        ``produced.json``); None when missing or unreadable."""
        got = self.remote.get(f"{rel}/{MANIFEST}")
        if got is None:
            return None
        record = self.remote.get(f"{rel}/{PRODUCED}")
        return parse_manifest(got.data, None if record is None else record.data)

    def _checked_manifest(
        self, stage: str, key: str, objects: dict[str, Entry]
    ) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, None)`` for a published folder whose ``objects`` (its listing)
        match its manifest; ``(None, reason)`` otherwise (reason None: nothing there)."""
        url = self.published(stage, key)
        if MANIFEST not in objects:
            unfinished = f"{url} has {len(objects)} files but no {MANIFEST} (an unfinished commit)"
            return None, unfinished if objects else None
        manifest = self._read_published(f"{stage}/{key}")
        if manifest is None:
            return None, f"{url}/{MANIFEST} or {PRODUCED} is unreadable"
        problem = remote_problem(url, objects, manifest.get("files", {}))
        return (None, problem) if problem else (manifest, None)

    def lookup(
        self, stage: str, key: str, verify: Verify = "auto"
    ) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, None)`` when the published folder verifies and a verified local
        copy is at :meth:`final_dir`; ``(None, reason)`` otherwise (reason None: none)."""
        manifest, reason = self._checked_manifest(stage, key, self.remote.list(f"{stage}/{key}"))
        if manifest is None:
            return None, reason
        local = self.final_dir(stage, key)
        files = manifest.get("files", {})
        if read_manifest(local) == manifest and verify_files(local, files, verify) is None:
            return manifest, None
        problem = self._download(stage, key, manifest)
        return (None, problem) if problem else (manifest, None)

    def _download(self, stage: str, key: str, manifest: dict[str, Any]) -> str | None:
        """Fetch the published folder into a fresh local folder, verify every file
        (size, sha256) and move it into place; the problem in words, or None."""
        rel = f"{stage}/{key}"
        files: dict[str, dict[str, Any]] = manifest.get("files", {})
        tmp = self.root / stage / f"{key}.dl-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            self.remote.download([(f"{rel}/{f}", tmp / f) for f in sorted(files)])
            for f, meta in sorted(files.items()):
                p = tmp / f
                size = p.stat().st_size if p.exists() else -1
                if size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                    return (
                        f"{self.published(stage, key)}/{f} does not match its manifest "
                        f"({'sha256 differs' if size == meta['bytes'] else 'size differs'})"
                    )
                mtime = int(meta.get("mtime_ns") or time.time_ns())
                os.utime(p, ns=(mtime, mtime))
            write_manifest(tmp, manifest)
            install(tmp, self.final_dir(stage, key))
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def committed(self, verify: bool = True) -> Iterator[Committed]:
        """Every published folder whose objects match its manifest (one listing of the
        whole store; ``verify`` is implied), then the kept rows of every replaced one
        (``<stage>/<key>.history/<producer>-<time>/``)."""
        listing = self.remote.list()
        folders: dict[tuple[str, str], dict[str, Entry]] = {}
        for name, entry in listing.items():
            parts = name.split("/", 2)
            if len(parts) == 3 and not parts[1].endswith((".lease", ".history")):
                folders.setdefault((parts[0], parts[1]), {})[parts[2]] = entry
        for (stage, key), objects in sorted(folders.items()):
            yield Committed(
                self.published(stage, key), *self._checked_manifest(stage, key, objects)
            )
        for name in sorted(listing):
            parts = name.split("/")
            if len(parts) == 4 and parts[1].endswith(".history") and parts[3] == MANIFEST:
                got = self.remote.get(name)
                old = None if got is None else parse_history(got.data)
                where = self.remote.url_of(name.removesuffix(f"/{MANIFEST}"))
                yield Committed(where, old, None if old else f"{where}: unreadable manifest", True)

    @contextlib.contextmanager
    def rows_folder(self, entry: Committed) -> Iterator[Path]:
        """A temporary local folder holding ``rows/`` of ``entry``, downloaded and (for a
        committed folder) checked against its manifest; StorageError when they differ."""
        assert entry.manifest is not None
        prefix = entry.where.removeprefix(self.remote.url + "/")
        with tempfile.TemporaryDirectory(prefix="gptflow-rows-") as tmp:
            dest = Path(tmp)
            if entry.history:
                names = {f"{ROWS_DIR}/{t}.parquet": None for t in sorted(entry.manifest["rows"])}
            else:
                files = entry.manifest.get("files", {})
                names = {f: m for f, m in files.items() if f.startswith(f"{ROWS_DIR}/")}
            self.remote.download([(f"{prefix}/{f}", dest / f) for f in sorted(names)])
            for f, meta in sorted(names.items()):
                if meta is not None and sha256_file(dest / f) != meta["sha256"]:
                    raise StorageError(f"{entry.where}/{f} does not match its manifest")
            yield dest

    # ------------------------------------------------------------------ writing
    def _keep_published_history(self, stage: str, key: str, old: dict[str, Entry]) -> None:
        """Before a recomputation replaces a published result, keep the replaced run's
        rows (their Parquet objects, copied on the server) and its manifest (without the
        file list) under ``<key>.history/`` for ``gptflow catalog rebuild``, as a local
        store does."""
        manifest = self._read_published(f"{stage}/{key}")
        if manifest is None or not manifest.get("rows"):
            return
        dest = f"{stage}/{key}.history/{history_name(manifest)}"
        if self.remote.get(f"{dest}/{MANIFEST}") is not None:
            return
        for name in sorted(old):
            if name.startswith(f"{ROWS_DIR}/"):
                self.remote.copy(f"{stage}/{key}/{name}", f"{dest}/{name}")
        self.remote.create(f"{dest}/{MANIFEST}", history_text(manifest).encode())

    def commit(
        self, stage: str, key: str, entries: dict[str, Any], lease: LeaseBase
    ) -> dict[str, Any]:
        """Upload the work folder, publish its manifest last (conditional put), and move
        the work folder into place as the local copy. Returns the manifest. Refuses
        (:class:`~tasks.store.lease.LeaseLost`) when this run no longer holds ``lease``."""
        rel = f"{stage}/{key}"
        work = self.held_work_dir(stage, key, lease)
        files = describe_files(work)
        old = self.remote.list(rel)
        lease.confirm()
        if old:  # an older or damaged version: unpublish it (manifest first), then clear it
            self._keep_published_history(stage, key, old)
            self.remote.delete([f"{rel}/{MANIFEST}", *(f"{rel}/{n}" for n in old if n != MANIFEST)])
        self.remote.upload([(work / f, f"{rel}/{f}") for f in sorted(files)])
        listing = self.remote.list(rel)
        for f, meta in files.items():
            entry = listing.get(f)
            if entry is None or entry.size != meta["bytes"]:
                raise StorageError(
                    f"uploading {self.published(stage, key)}/{f} did not store it whole; "
                    "nothing was published, rerun the stage"
                )
            meta["etag"] = entry.etag
        full = complete(stage, key, entries, files)
        content, record = manifest_texts(full)
        lease.confirm()
        for name, text in ((PRODUCED, record), (MANIFEST, content)):  # the manifest last
            if self.remote.create(f"{rel}/{name}", text.encode()) is None:
                raise StorageError(
                    f"{self.published(stage, key)} was published by another run while this "
                    "one was committing it (its lease was taken over); the other result "
                    "stands, rerun to use it"
                )
        write_manifest(work, full)
        install(work, self.final_dir(stage, key))
        return full
