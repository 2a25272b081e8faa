"""Presentation of query results for the command line: aligned tables, CSV, JSON."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING

from gpt.errors import CatalogError
from tasks.jsonable import plain

if TYPE_CHECKING:
    import pandas as pd


#: Characters a table cell shows before it is cut.
MAX_WIDTH = 60


def format_df(df: pd.DataFrame, fmt: str = "table", *, uncut: Collection[str] = ()) -> str:
    """Render a query result as ``table`` (aligned text, long cells cut to
    :data:`MAX_WIDTH` characters, except in the ``uncut`` columns), ``csv`` or ``json``
    (a list of row objects)."""
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
    columns = [_column_cells(df.iloc[:, i], str(c) in uncut) for i, c in enumerate(df.columns)]
    widths = [max([len(h), *map(len, cells)]) for h, cells in zip(headers, columns, strict=True)]
    numeric = [pd.api.types.is_numeric_dtype(df.iloc[:, i]) for i in range(len(df.columns))]
    pads = [str.rjust if num else str.ljust for num in numeric]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        parts = [pad(c, w) for c, w, pad in zip(cells, widths, pads, strict=True)]
        return " | ".join(parts).rstrip()

    out = [line(headers), "-+-".join("-" * w for w in widths)]
    n = len(df)
    out += [line(cells) for cells in (zip(*columns, strict=True) if columns else [()] * n)]
    out.append(f"({n} row{'s' if n != 1 else ''})")
    return "\n".join(out)


def _column_cells(col: pd.Series, whole: bool) -> list[str]:
    """One column's cells as table text: NULL for missing values, floats to 6 significant
    digits, line breaks and tabs escaped, cut to :data:`MAX_WIDTH` unless ``whole``. Done
    a column at a time (a year of judged examples is ~10^6 cells)."""
    missing = col.isna().to_numpy()
    cells = [
        "NULL" if na else (f"{v:.6g}" if isinstance(v, float) else str(v))
        for v, na in zip(col.to_numpy(dtype=object), missing, strict=True)
    ]
    if any("\r" in c or "\n" in c or "\t" in c for c in cells):
        cells = [c.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ") for c in cells]
    if not whole:
        cells = [c if len(c) <= MAX_WIDTH else c[: MAX_WIDTH - 3] + "..." for c in cells]
    return cells
