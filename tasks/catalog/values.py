"""How Python values become catalog values: UTC timestamps, JSON text, row frames, and
the checkpoint digest recorded with each checkpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CheckpointError

if TYPE_CHECKING:
    import pandas as pd


def utcnow() -> dt.datetime:
    """Now, in UTC, as a naive datetime (how the catalog stores timestamps)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def to_utc_naive(value: Any) -> Any:
    """A timestamp-like value converted to naive UTC (strings parsed; naive = UTC)."""
    import pandas as pd

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value is pd.NaT:
        return None
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        return None
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_pydatetime()


def to_json(value: Any) -> str | None:
    """A JSON column value: dicts/lists/numbers serialised; valid JSON strings kept."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return json.dumps(value)
        return value
    return json.dumps(value, default=str, sort_keys=True)


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def as_frame(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows materialised once (a generator is consumed here, before any transaction, so
    a re-run transaction sees the same rows and a failing generator writes nothing)."""
    import pandas as pd

    return rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))


def checkpoint_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a checkpoint file or folder (see ``record_checkpoint``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; cannot record it in the catalog")
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), p.stat().st_size
    total = 0
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p).as_posix().encode()
        h.update(rel + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
        total += f.stat().st_size
    return h.hexdigest(), total
