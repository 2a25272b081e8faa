"""Content-addressed stage cache.

Each stage's cache key is a hash of: the stage name, its config section, the *content*
digests of its inputs (upstream manifests), and a fingerprint of the source code of the
library modules it runs (Prefect's TASK_SOURCE only sees the task function itself).
Outputs live in ``artifacts/stages/<stage>/<key>/`` with a ``manifest.json`` written last.
A lookup trusts a manifest only when every file it lists still exists with the recorded
size and sha256 — a cached result whose files were deleted or damaged is recomputed.

Because downstream keys use the upstream *content* digest, recomputing a stage that
produces identical files leaves downstream cached; changed files recompute exactly what
depends on them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt.fileio import sha256_file
from gpt.paths import artifacts_dir

MANIFEST = "manifest.json"


def stable_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


_FP_CACHE: dict[tuple[str, ...], str] = {}


def code_fingerprint(modules: list[str] | tuple[str, ...]) -> str:
    """sha256 over the source files of ``modules`` (e.g. ``gpt.model``); any edit to
    them changes the fingerprint."""
    key = tuple(sorted(modules))
    if key in _FP_CACHE:
        return _FP_CACHE[key]
    h = hashlib.sha256()
    for name in key:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"cannot fingerprint module {name!r}: not found")
        h.update(name.encode())
        h.update(Path(spec.origin).read_bytes())
    _FP_CACHE[key] = h.hexdigest()
    return _FP_CACHE[key]


@dataclass
class StageOutput:
    """The small, JSON-able manifest a stage returns and downstream stages take as input.

    ``files`` maps paths relative to ``root`` to their sha256 and size; ``digest`` hashes
    those (the content fingerprint downstream keys use); ``data`` holds small results
    (paths, counts, final metrics)."""

    stage: str
    key: str
    root: str
    run_id: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    created_at: float = 0.0
    cache_hit: bool = False

    def path(self, rel: str) -> Path:
        """Absolute path of an output file or folder."""
        return Path(self.root) / rel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageOutput:
        return cls(**d)


def content_digest(files: dict[str, dict[str, Any]], data: dict[str, Any] | None = None) -> str:
    """Digest of a stage's outputs: the hashes of its files (timings and other volatile
    result data stay out, so an identical recomputation keeps downstream keys). A stage
    without files digests ``data``."""
    payload = {"files": files} if files else {"data": data}
    return hashlib.sha256(stable_json(payload).encode()).hexdigest()


class StageCache:
    """Content-addressed output folders under ``artifacts/stages``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else artifacts_dir() / "stages"

    def key(
        self,
        stage: str,
        config: dict[str, Any],
        inputs: dict[str, StageOutput | None],
        modules: list[str] | tuple[str, ...],
    ) -> str:
        """The cache key of one stage execution."""
        payload = {
            "stage": stage,
            "config": config,
            "inputs": {k: (v.digest if v is not None else None) for k, v in inputs.items()},
            "code": code_fingerprint(modules),
        }
        return hashlib.sha256(stable_json(payload).encode()).hexdigest()[:24]

    def final_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Where a stage computes; kept across crashes so training can resume."""
        return self.root / stage / f"{key}.partial"

    def lookup(self, stage: str, key: str) -> StageOutput | None:
        """A verified manifest, or None when absent or any listed file is missing/changed."""
        folder = self.final_dir(stage, key)
        mpath = folder / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        out = StageOutput.from_dict(manifest)
        out.root = str(folder)
        for rel, meta in out.files.items():
            p = folder / rel
            try:
                if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                    return None
            except OSError:
                return None
        return out

    def commit(
        self, stage: str, key: str, run_id: str, data: dict[str, Any], files: list[str]
    ) -> StageOutput:
        """Hash ``files`` (relative to the work dir), write the manifest, and move the work
        dir into place atomically (replacing an invalid older copy)."""
        work = self.work_dir(stage, key)
        final = self.final_dir(stage, key)
        recorded = {}
        for rel in sorted(files):
            p = work / rel
            recorded[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        out = StageOutput(
            stage=stage,
            key=key,
            root=str(final),
            run_id=run_id,
            files=recorded,
            data=data,
            digest=content_digest(recorded, data),
            created_at=time.time(),
        )
        tmp = work / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(out.to_dict(), indent=2, default=str))
        os.replace(tmp, work / MANIFEST)
        if final.exists():
            trash = final.with_name(f"{key}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(work, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, final)
        return out

    def fresh_work_dir(self, stage: str, key: str, *, resume: bool) -> Path:
        """The work dir, emptied unless ``resume`` (then a crashed attempt is continued)."""
        work = self.work_dir(stage, key)
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return work
