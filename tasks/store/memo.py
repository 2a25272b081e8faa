"""Results derived from the catalog, kept under a key of their inputs: a run whose
inputs match an earlier run's reuses what was derived then (its report, its gates)
instead of reading the rows again. Files ``<artifacts>/<kind>/<key>.json``, written
atomically; a missing or unreadable one is a miss."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def memo_key(parts: Any) -> str:
    """A key of ``parts`` (anything JSON can write; other values by ``str``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def memo_path(kind: str, key: str) -> Path:
    from gpt.paths import artifacts_dir

    return artifacts_dir() / kind / f"{key}.json"


def read_memo(kind: str, key: str) -> dict[str, Any] | None:
    """What was kept under ``key``, or None."""
    try:
        kept = json.loads(memo_path(kind, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) else None


def write_memo(kind: str, key: str, value: dict[str, Any]) -> None:
    """Keep ``value`` under ``key``; a failure is logged (only a later reuse is lost)."""
    from gpt.fileio import atomic_open

    path = memo_path(kind, key)
    try:
        with atomic_open(path, "w", encoding="utf-8") as fh:
            json.dump(value, fh, default=str)
    except OSError as exc:
        log.warning("could not keep %s %s at %s: %s", kind, key, path, exc)
