"""What stages exchange: a finished stage as downstream stages see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageOutput:
    """A finished stage as downstream stages see it: where its folder is, who produced
    it, the digest of its content, and its typed result (``out``; ``data`` is the same
    as a plain dict). Paths in ``out`` are relative to ``root``: use :meth:`path`."""

    stage: str
    key: str
    root: str
    run_id: str
    """The run that computed this result (its catalog rows are stored under it)."""
    digest: str = ""
    out: Any = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_hit: bool = False
    created_at: float = 0.0

    def path(self, rel: str) -> Path:
        """Absolute path of a file or folder of this stage."""
        return Path(self.root) / rel

    @property
    def data(self) -> dict[str, Any]:
        """The typed result as a plain JSON-able dict."""
        if self.out is None:
            return {}
        if hasattr(self.out, "model_dump"):
            return self.out.model_dump(mode="json")
        return dict(self.out)
