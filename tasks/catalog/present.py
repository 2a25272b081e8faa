"""Presentation of query results for the command line: aligned tables, CSV, JSON."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError
from tasks.jsonable import plain

if TYPE_CHECKING:
    import pandas as pd


def _cell(value: Any) -> str:
    import pandas as pd

    if value is None:
        return "NULL"
    try:
        if pd.isna(value):
            return "NULL"
    except (TypeError, ValueError):
        pass
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_df(
    df: pd.DataFrame,
    fmt: str = "table",
    *,
    max_width: int = 60,
    uncut: Collection[str] = (),
) -> str:
    """Render a query result as ``table`` (aligned text, long cells cut to ``max_width``
    characters, except in the ``uncut`` columns), ``csv`` or ``json`` (a list of row
    objects)."""
    import pandas as pd

    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [
            {str(k): plain(v) for k, v in zip(df.columns, row, strict=True)}
            for row in df.itertuples(index=False, name=None)
        ]
        return json.dumps(records, indent=2, ensure_ascii=False)
    if fmt != "table":
        raise CatalogError(f"unknown output format {fmt!r}; use table, csv or json")

    headers = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    rows: list[list[str]] = []
    keep = [str(c) in uncut for c in df.columns]
    for row in df.itertuples(index=False, name=None):
        cells = []
        for v, whole in zip(row, keep, strict=True):
            s = _cell(v).replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")
            if len(s) > max_width and not whole:
                s = s[: max_width - 3] + "..."
            cells.append(s)
        rows.append(cells)
    widths = [len(h) for h in headers]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(headers), "-+-".join("-" * w for w in widths)]
    out += [line(cells) for cells in rows]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
