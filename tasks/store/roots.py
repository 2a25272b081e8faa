"""The artifacts root: a local folder (or ``file://`` URL) or an object-store URL, and
the stage store each kind opens."""

from __future__ import annotations

from pathlib import Path

from gpt.paths import is_remote, local_path, url_protocol
from tasks.store.folder import StageStore


def open_stage_store(artifacts: str | Path) -> StageStore:
    """The stage store of an artifacts root: ``<root>/stages`` in a local folder, or on
    an object store (``s3://…``, :mod:`tasks.store.object_store`)."""
    if is_remote(artifacts):
        from tasks.store.object_store import ObjectStageStore

        return ObjectStageStore(str(artifacts))
    return StageStore(local_root(artifacts) / "stages")


def local_root(artifacts: str | Path) -> Path:
    """A local artifacts root as a path (a ``file://`` URL's path; a plain path as is)."""
    if url_protocol(str(artifacts)) in ("file", "local"):
        return local_path(artifacts)
    return Path(artifacts)


def root_child(artifacts: str | Path, name: str) -> str | Path:
    """``<root>/<name>``: an URL for an object-store root, else a local path."""
    if is_remote(artifacts):
        return f"{str(artifacts).rstrip('/')}/{name}"
    return local_root(artifacts) / name
