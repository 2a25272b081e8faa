"""Read-only access for people: ``gptflow sql`` runs a user's query on a read-only
connection with file-system access disabled.

On the DuckDB file: the published file (or, asked for, the live one) opened
``read_only`` with ``enable_external_access=false``.

On a DuckLake, DuckDB must still read the lake's Parquet files and reach its metadata
database, so the extensions are loaded and the lake attached ``READ_ONLY`` first (its
metadata connection then runs read-only PostgreSQL transactions), then external access is
disabled except for ``data_path`` (``allowed_directories``) and the configuration is
locked. That leaves two ways to write, both closed before the query runs:

* ``allowed_directories`` lets ``COPY … TO`` / ``EXPORT`` write under ``data_path``: only
  queries are accepted (``SELECT``, ``FROM …``, ``WITH``, ``VALUES``, ``DESCRIBE``,
  ``SHOW``, ``SUMMARIZE``, ``PRAGMA table_info``);
* DuckLake's maintenance table functions (``ducklake_flush_inlined_data``,
  ``ducklake_merge_adjacent_files``, …) write Parquet files even on a read-only attach:
  the query's parse tree (``json_serialize_sql``) is searched for function calls, and only
  DuckLake's read-only ones pass; so do none of the postgres/sqlite scanner's functions
  (direct access to the metadata database) nor ``query()`` (SQL hidden in a string).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError
from tasks.catalog.connections import LAKE_ALIAS, is_write_refusal, new_lake_connection
from tasks.catalog.settings import CatalogSettings
from tasks.catalog.store import Catalog
from tasks.catalog.values import sql_str

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

_REFUSED = (
    "the catalog is opened read-only by `gptflow sql`; statements that write (INSERT, "
    "UPDATE, DELETE, CREATE, DROP, COPY, ATTACH, ...) are refused."
)


#: DuckLake functions that only read (with or without the ``ducklake_`` prefix).
LAKE_READ_FUNCTIONS = frozenset(
    {
        "snapshots",
        "current_snapshot",
        "last_committed_snapshot",
        "list_files",
        "options",
        "settings",
        "table_info",
        "table_changes",
        "table_insertions",
        "table_deletions",
    }
)


def run_readonly_sql(
    db_path: str | Path | None,
    sql: str,
    *,
    settings: CatalogSettings | None = None,
    live: bool = False,
) -> pd.DataFrame:
    """Run a user's query read-only (used by ``gptflow sql``) and return the result.

    ``db_path`` names a DuckDB file; with ``db_path`` and ``settings`` both None the
    environment picks the catalog (:meth:`CatalogSettings.from_env`). On the DuckDB file
    the query reads the published snapshot (it never waits for a run, nor makes one
    wait); ``live`` reads the writers' live file instead (waiting while a writer holds
    it). File-system access from SQL (COPY TO, ATTACH, INSTALL) is disabled. A write
    statement raises :class:`CatalogError`; so does a missing database.
    """
    if settings is None:
        settings = Catalog(db_path).settings
    if settings.is_lake:
        return _lake_sql(settings, sql)
    cat = Catalog(settings=settings, snapshot=not live)
    with cat.connect(read_only=True, config={"enable_external_access": False}) as con:
        return _run(con, sql, str(cat.path))


def _run(con: duckdb.DuckDBPyConnection, sql: str, where: str) -> pd.DataFrame:
    import duckdb

    try:
        result = con.execute(sql)
        if result is None:  # nothing but whitespace or comments
            raise CatalogError(f"the query {sql.strip()!r} holds no statement: give a SELECT")
        return result.df()
    except duckdb.Error as exc:
        if is_write_refusal(exc):
            raise CatalogError(f"{_REFUSED} {where} is unchanged. DuckDB said: {exc}") from exc
        raise CatalogError(f"query failed on {where}: {exc}") from exc


def lock_down(con: duckdb.DuckDBPyConnection, settings: CatalogSettings) -> None:
    """Disable file-system access except to the lake's data, and lock the settings."""
    con.execute(f"SET allowed_directories = [{sql_str(str(settings.data_path))}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _function_calls(tree: Any) -> Iterator[tuple[str, str, str]]:
    """(catalog, schema, name) of every function call in a serialised parse tree."""
    if isinstance(tree, dict):
        if isinstance(tree.get("function_name"), str):
            yield (
                str(tree.get("catalog") or ""),
                str(tree.get("schema") or ""),
                tree["function_name"].lower(),
            )
        for value in tree.values():
            yield from _function_calls(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _function_calls(value)


def _refused_function(catalog: str, schema: str, name: str) -> bool:
    on_lake = LAKE_ALIAS in (catalog.lower(), schema.lower()) or name.startswith("ducklake_")
    if on_lake:
        return name.removeprefix("ducklake_") not in LAKE_READ_FUNCTIONS
    return name.startswith(("postgres_", "sqlite_")) or name == "query"


def _check_lake_query(con: duckdb.DuckDBPyConnection, stmt: Any, where: str) -> None:
    """Refuse anything but a query that calls no writing function (see the module doc)."""
    import duckdb

    if stmt.type != duckdb.StatementType.SELECT:
        kind = str(stmt.type).rsplit(".", 1)[-1]
        raise CatalogError(
            f"{_REFUSED} {where} is unchanged. On a shared DuckLake only queries (SELECT, "
            f"DESCRIBE, SHOW, SUMMARIZE) run; this is a {kind} statement"
        )
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [stmt.query]).fetchone()[0])
    if tree.get("error"):
        raise CatalogError(
            f"{_REFUSED} {where} is unchanged. On a shared DuckLake only plain queries run, "
            f"and this one cannot be checked ({tree.get('error_message')}); write it as a "
            "plain SELECT"
        )
    for catalog, schema, name in _function_calls(tree):
        if _refused_function(catalog, schema, name):
            raise CatalogError(
                f"{_REFUSED} {where} is unchanged. {name}() may write to the lake or reach "
                "past it, so `gptflow sql` does not run it; run maintenance with a writer"
            )


def _lake_sql(settings: CatalogSettings, sql: str) -> pd.DataFrame:
    import duckdb

    where = settings.location()
    con = new_lake_connection(settings, read_only=True)
    try:
        lock_down(con, settings)
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise CatalogError(f"query failed on {where}: {exc}") from exc
        for stmt in statements:
            _check_lake_query(con, stmt, where)
        return _run(con, sql, where)
    finally:
        con.close()
