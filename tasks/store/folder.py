"""Stage folders in a local (or shared) folder: lookup, work folders, atomic commits.

A result lives in ``<root>/<stage>/<key>/`` with its manifest. Work happens in
``<key>.<owner>.partial/``, named by the holder's lease and kept after a crash so
training resumes; it is renamed into place only by a run that still holds the lease.
A recomputation keeps the replaced run's rows in ``<key>.history/`` for a rebuild.
:class:`StageStore` is also the interface of the object store
(:mod:`tasks.store.object_store`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.store.lease import Lease, LeaseBase, LeaseLost
from tasks.store.manifest import (
    MANIFEST,
    ROWS_DIR,
    Verify,
    complete,
    describe_files,
    history_name,
    history_text,
    parse_history,
    read_manifest,
    verify_files,
    write_manifest,
)

#: Suffixes of the folders beside the results: work folders, replaced results' rows.
NOT_RESULTS = (".partial", ".history", ".lease")


@dataclass(frozen=True)
class Committed:
    """One committed result, or the kept rows of a replaced one, as a rebuild reads it."""

    where: str
    """Its folder or URL (for messages)."""
    manifest: dict[str, Any] | None
    """None when it is damaged (``problem`` says why)."""
    problem: str | None = None
    history: bool = False
    """True for a replaced result's rows (``<key>.history/…``)."""


class StageStore:
    """Stage folders under ``root`` on a file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def final_dir(self, stage: str, key: str) -> Path:
        """The committed folder (for an object store: its verified local copy)."""
        return self.root / stage / key

    def work_dir(self, stage: str, key: str, lease: LeaseBase) -> Path:
        """Where the holder of ``lease`` computes; kept across crashes so training can
        resume. Named by the holder: a run whose lease was broken no longer finds it."""
        return self.root / stage / f"{key}.{lease.owner}.partial"

    def published(self, stage: str, key: str) -> str | None:
        """Where the folder is published when that is not :meth:`final_dir` (the URL on an
        object store); None here."""
        return None

    def lease(self, stage: str, key: str, run_id: str) -> LeaseBase:
        """The lease that makes one run at a time compute ``key`` (:mod:`tasks.store.lease`)."""
        return Lease(self.root / stage / f"{key}.lease", run_id)

    def lookup(
        self, stage: str, key: str, verify: Verify = "auto"
    ) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, None)`` for a complete, verified result; ``(None, reason)`` when
        there is none (reason None) or it is incomplete/damaged (reason says what)."""
        folder = self.final_dir(stage, key)
        if not folder.exists():
            return None, None
        manifest = read_manifest(folder)
        if manifest is None:
            return None, f"{folder / MANIFEST} is missing or unreadable"
        problem = verify_files(folder, manifest.get("files", {}), verify)
        if problem is not None:
            return None, problem
        return manifest, None

    def fresh_work_dir(self, stage: str, key: str, lease: LeaseBase, *, resume: bool) -> Path:
        """The work dir of the holder of ``lease``: with ``resume``, the folder of the
        latest earlier attempt (a crashed run, or one whose lease was broken) taken over
        by renaming it; otherwise empty. Other earlier folders are removed, and so are
        the hidden companions of every earlier one (``.<folder>.*``)."""
        work = self.work_dir(stage, key, lease)
        folder = self.root / stage
        earlier = [*folder.glob(f"{key}.*.partial"), *folder.glob(f"{key}.partial")]
        earlier = sorted((p for p in earlier if p != work), key=_mtime, reverse=True)
        for old in earlier:
            for companion in folder.glob(f".{old.name}.*"):  # e.g. a failed launch's files
                shutil.rmtree(companion, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                if resume and not work.exists():
                    os.rename(old, work)
                    continue
                _remove(old, key)
        work.mkdir(parents=True, exist_ok=True)
        return work

    def held_work_dir(self, stage: str, key: str, lease: LeaseBase) -> Path:
        """The work dir of ``lease``'s holder, checked before publishing it: raises
        :class:`LeaseLost` when the lease is no longer this run's, or when the next
        holder took the folder over (renamed it) — then that run's result stands."""
        lease.confirm()
        work = self.work_dir(stage, key, lease)
        if not work.is_dir():
            raise LeaseLost(
                f"the work folder {work} was taken over by the next holder of the lease "
                f"{lease.where} (this run stalled past the lease TTL); it must not publish"
            )
        return work

    def commit(
        self, stage: str, key: str, entries: dict[str, Any], lease: LeaseBase
    ) -> dict[str, Any]:
        """Describe every file of the work dir, write the manifest (:func:`complete` of
        ``entries``) last, and rename the work dir into place (replacing an older or
        damaged copy). Returns the manifest. Refuses (:class:`LeaseLost`) when this run
        no longer holds ``lease``."""
        try:
            work = self.held_work_dir(stage, key, lease)
            manifest = complete(stage, key, entries, describe_files(work))
            write_manifest(work, manifest)
            self.held_work_dir(stage, key, lease)
            final = self.final_dir(stage, key)
            if final.exists():
                old = read_manifest(final)
                if old is not None:
                    self._keep_history(stage, key, old, final / ROWS_DIR)
            install(work, final)
            return manifest
        except FileNotFoundError:  # the folder vanished: taken over by the next holder?
            self.held_work_dir(stage, key, lease)
            raise

    def _keep_history(self, stage: str, key: str, old: dict[str, Any], rows: Path) -> None:
        """A recomputation (forced, or of a damaged folder) replaces a result another run
        produced; that run's catalog rows stay history, so keep their Parquet files and
        manifest (not the large files) for ``gptflow catalog rebuild``."""
        if not old.get("rows"):
            return
        dest = self.root / stage / f"{key}.history" / history_name(old)
        if dest.exists():
            return
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if rows.is_dir():
            shutil.copytree(rows, tmp / ROWS_DIR)
        else:
            tmp.mkdir(parents=True)
        (tmp / MANIFEST).write_text(history_text(old))
        os.replace(tmp, dest)

    # ------------------------------------------------------------------ for a rebuild
    def committed(self, verify: bool = True) -> Iterator[Committed]:
        """Every committed result (checked against its manifest unless not ``verify``),
        then the kept rows of every replaced one."""
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.glob("*/*") if p.is_dir()):
            if (
                folder.name.endswith(NOT_RESULTS)
                or folder.name.startswith(".")
                or ".old-" in (folder.name)
            ):
                continue
            manifest = read_manifest(folder)
            problem = None if manifest else "no readable manifest"
            if manifest and verify:
                problem = verify_files(folder, manifest.get("files", {}))
            yield Committed(
                str(folder), None if problem else manifest, problem and f"{folder}: {problem}"
            )
        for entry in sorted(self.root.glob("*/*.history/*/manifest.json")):
            try:
                old = parse_history(entry.read_bytes())
            except OSError:
                old = None
            problem = None if old else f"{entry.parent}: unreadable manifest"
            yield Committed(str(entry.parent), old, problem, history=True)

    @contextlib.contextmanager
    def rows_folder(self, entry: Committed) -> Iterator[Path]:
        """A local folder holding ``rows/`` of ``entry`` (here: its own folder)."""
        yield Path(entry.where)


def install(folder: Path, final: Path) -> None:
    """Rename the complete ``folder`` to ``final``, replacing an older copy there. When
    ``folder`` vanishes meanwhile (taken over by the next holder of the lease) the older
    copy is put back and FileNotFoundError raised; when another process installed
    ``final`` meanwhile (a verified download of the same folder), ``folder`` is dropped."""
    trash = final.with_name(f"{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(final, trash)
    except FileNotFoundError:
        trash = None
    try:
        os.replace(folder, final)
    except FileNotFoundError:
        if trash is not None:
            os.replace(trash, final)
        raise
    except OSError:  # ``final`` is there again: another process's copy of the same result
        shutil.rmtree(folder, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove(folder: Path, key: str) -> None:
    """Remove an earlier work folder (renamed aside first, so a half-removed one is
    never taken for a work folder)."""
    trash = folder.with_name(f"{key}.old-{uuid.uuid4().hex[:12]}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
