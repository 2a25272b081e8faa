"""Rows into catalog tables, on an open connection: a table's columns, rows normalised to
its types, delete by key, typed inserts.

:class:`~tasks.catalog.store.Catalog` runs these inside its transactions; :mod:`tasks.records.rows`
uses them to type a stage's rows exactly as the catalog stores them. ``location`` (the
catalog, for messages) is the only thing they know of the catalog they write.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError
from tasks.catalog.schema import KNOWN_TABLES
from tasks.catalog.values import quote_ident, to_json, to_utc_naive

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

__all__ = [
    "check_table",
    "delete_where",
    "insert_frame",
    "insert_parquet",
    "match",
    "replace_in",
    "table_columns",
    "typed_frame",
    "upsert_in",
]


def check_table(table: str) -> None:
    """Refuse a table the catalog does not have (table names reach SQL as text)."""
    if table not in KNOWN_TABLES:
        raise CatalogError(
            f"unknown catalog table {table!r}; known tables: {', '.join(sorted(KNOWN_TABLES))}"
        )


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """``{column: SQL type}`` of ``table``, in column order."""
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog "
        "= current_database() AND table_schema = 'main' AND table_name = ? "
        "ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return {name: dtype for name, dtype in rows}


def typed_frame(
    table: str,
    rows: pd.DataFrame | Sequence[Mapping[str, Any]],
    cols: dict[str, str],
    location: str,
) -> pd.DataFrame:
    """Rows as a DataFrame with table columns only, JSON/TIMESTAMP values normalised."""
    import pandas as pd

    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    unknown = [c for c in df.columns if c not in cols]
    if unknown:
        raise CatalogError(
            f"columns {unknown} are not in catalog table {table!r} of {location}; "
            f"its columns are {list(cols)}"
        )
    for col in df.columns:
        dtype = cols[col].upper()
        if dtype == "JSON":
            df[col] = pd.Series([to_json(v) for v in df[col]], index=df.index, dtype=object)
        elif dtype.startswith("TIMESTAMP"):
            df[col] = pd.Series([to_utc_naive(v) for v in df[col]], index=df.index, dtype=object)
    return df


def delete_where(
    con: duckdb.DuckDBPyConnection, table: str, where: Mapping[str, Any], cols: dict[str, str]
) -> None:
    """Delete the rows whose ``where`` columns hold the given values (NULL matches NULL)."""
    for key in where:
        if key not in cols:
            raise CatalogError(
                f"where-column {key!r} is not in catalog table {table!r}; "
                f"its columns are {list(cols)}"
            )
    if not where:
        raise CatalogError(
            f"replace_rows on {table!r} needs a non-empty `where` (e.g. run_id and "
            "stage); use a where that names the rows to replace"
        )
    cond, params = match(where)
    con.execute(f"DELETE FROM {table} WHERE {cond}", params)


def match(where: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """``where`` as an SQL condition and its parameters, NULL matching NULL: ``col = ?``
    for a value (DuckDB pushes it into the scan: ~15x less work than ``IS NOT DISTINCT
    FROM ?`` on a year of runs), ``col IS NULL`` for None."""
    conds = [
        f"{quote_ident(k)} IS NULL" if v is None else f"{quote_ident(k)} = ?"
        for k, v in where.items()
    ]
    return " AND ".join(conds), [v for v in where.values() if v is not None]


def _view_name(kind: str) -> str:
    """A name for a registered DataFrame, unique per process and thread."""
    return f"_gptflow_{kind}_{os.getpid()}_{threading.get_ident()}"


def insert_frame(
    con: duckdb.DuckDBPyConnection, table: str, df: pd.DataFrame, cols: dict[str, str]
) -> int:
    """Insert ``df`` (columns of ``table``), each value cast to its column's type."""
    if len(df) == 0 or len(df.columns) == 0:
        return 0
    names = list(df.columns)
    view = _view_name("in")
    con.register(view, df)
    try:
        target = ", ".join(quote_ident(c) for c in names)
        select = ", ".join(
            f"CAST({quote_ident(c)} AS {cols[c]}) AS {quote_ident(c)}" for c in names
        )
        con.execute(f"INSERT INTO {table} ({target}) SELECT {select} FROM {view}")
    finally:
        con.unregister(view)
    return len(df)


def replace_in(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: pd.DataFrame,
    where: Mapping[str, Any],
    location: str,
) -> int:
    """Delete the rows matching ``where`` and insert ``rows`` (``where`` values filled
    into rows lacking them). Returns the rows inserted."""
    cols = table_columns(con, table)
    df = typed_frame(table, rows, cols, location)
    for k, v in where.items():
        if k not in df.columns and len(df):
            df[k] = [v] * len(df)
    delete_where(con, table, where, cols)
    return insert_frame(con, table, df, cols)


def insert_parquet(
    con: duckdb.DuckDBPyConnection,
    table: str,
    path: str | Path,
    wheres: Sequence[Mapping[str, Any]],
) -> int:
    """Delete the rows matching any of ``wheres``, then insert the Parquet file's rows
    (its columns must be the table's). Returns the rows inserted."""
    cols = table_columns(con, table)
    src = str(path).replace("'", "''")
    desc = con.execute(f"SELECT * FROM read_parquet('{src}') LIMIT 0").description
    have = [d[0] for d in desc]
    unknown = [c for c in have if c not in cols]
    if unknown:
        raise CatalogError(f"{path}: columns {unknown} are not in catalog table {table!r}")
    for where in wheres:
        delete_where(con, table, where, cols)
    target = ", ".join(quote_ident(c) for c in have)
    select = ", ".join(f"CAST({quote_ident(c)} AS {cols[c]}) AS {quote_ident(c)}" for c in have)
    return con.execute(
        f"INSERT INTO {table} ({target}) SELECT {select} FROM read_parquet('{src}')"
    ).fetchone()[0]


def upsert_in(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: pd.DataFrame,
    key: Sequence[str],
    location: str,
) -> int:
    """Delete the rows sharing a ``key`` with one of ``rows`` (the last of duplicate
    keys wins), then insert ``rows``. Returns the rows inserted."""
    cols = table_columns(con, table)
    df = typed_frame(table, rows, cols, location)
    missing = [k for k in key if k not in df.columns]
    if missing:
        raise CatalogError(
            f"upsert_rows on {table!r}: key columns {missing} are missing from the rows"
        )
    if len(df) == 0:
        return 0
    df = df.drop_duplicates(subset=list(key), keep="last").reset_index(drop=True)
    view = _view_name("keys")
    con.register(view, df[list(key)])
    try:
        cond = " AND ".join(
            f"t.{quote_ident(k)} IS NOT DISTINCT FROM CAST(k.{quote_ident(k)} AS {cols[k]})"
            for k in key
        )
        con.execute(f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM {view} k WHERE {cond})")
    finally:
        con.unregister(view)
    return insert_frame(con, table, df, cols)
