"""How Python values become catalog values: UTC timestamps, JSON text, row frames, and
the checkpoint digest recorded with each checkpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
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
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if type(value) is dt.datetime:
        return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, str):
        try:
            return to_utc_naive(dt.datetime.fromisoformat(value))
        except ValueError:
            pass  # a form only pandas reads
    import pandas as pd

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


def json_object(raw: Any) -> dict[str, Any]:
    """A JSON column's object (text parsed), or ``{}`` when it holds none."""
    value = json.loads(raw) if isinstance(raw, str) else raw
    return value if isinstance(value, dict) else {}


def _literal(value: Any) -> str | None:
    """``value`` as an SQL literal, or None when it has no exact one here."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return f"CAST('{value!r}' AS DOUBLE)"  # exact: the shortest round-tripping text
    if type(value) is str:
        return None if "\0" in value else sql_str(value)
    if type(value) is dt.datetime:
        kind = "TIMESTAMPTZ" if value.tzinfo else "TIMESTAMP"
        return f"{kind} '{value.isoformat(sep=' ')}'"
    if type(value) is dt.date:
        return f"DATE '{value.isoformat()}'"
    if type(value) in (list, tuple):
        items = [_literal(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    return None


def inline_params(sql: str, params: Sequence[Any] | None) -> tuple[str, list[Any] | None]:
    """``sql`` with its ``?`` placeholders (outside quotes) replaced by the literals of
    ``params``, and no parameters left — DuckDB's Python client imports pandas (~0.4 s)
    to bind any parameter, which a cached rerun's look-ups never need. Values without an
    exact literal (and a count mismatch) keep ``sql`` and ``params`` as they are."""
    if not params:
        return sql, None
    literals = [_literal(v) for v in params]
    if None in literals:
        return sql, list(params)
    out, i, quote = [], 0, ""
    for ch in sql:
        if quote:
            quote = "" if ch == quote else quote  # '' and "" re-enter the same quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            if i == len(literals):
                return sql, list(params)
            out.append(literals[i])  # type: ignore[arg-type]
            i += 1
            continue
        out.append(ch)
    return ("".join(out), None) if i == len(literals) else (sql, list(params))


def sql_str(value: str) -> str:
    """``value`` as a single-quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def is_frame(rows: Any) -> bool:
    """``rows`` is a pandas DataFrame (checked without importing pandas)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(rows, pd.DataFrame)


def materialize(
    rows: pd.DataFrame | Iterable[Mapping[str, Any]],
) -> pd.DataFrame | list[dict[str, Any]]:
    """Rows materialised once, a DataFrame copied or a list of dicts (a generator is
    consumed here, before any transaction, so a re-run transaction sees the same rows and
    a failing generator writes nothing). Row lists stay lists: writing a few rows needs
    no pandas."""
    return rows.copy() if is_frame(rows) else [dict(r) for r in rows]


def checkpoint_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a checkpoint file or folder (see ``record_checkpoint``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; cannot record it in the catalog")
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    h = hashlib.sha256()

    def feed(f: Path) -> int:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return f.stat().st_size

    if p.is_file():
        total = feed(p)
    else:
        total = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            total += feed(f)
    return h.hexdigest(), total
