"""Read-only access for people: ``gptflow sql`` runs a user's query on a read-only
connection with file-system access disabled.

On the DuckDB file: the file opened ``read_only`` with ``enable_external_access=false``.

On a DuckLake, DuckDB must still read the lake's Parquet files and reach its metadata
database, so the extensions are loaded and the lake attached ``READ_ONLY`` first (its
metadata connection then runs read-only PostgreSQL transactions), then external access is
disabled except for ``data_path`` (``allowed_directories``) and the configuration is
locked. ``allowed_directories`` would also let ``COPY … TO`` write under ``data_path``, so
on a lake only SELECT-type statements are accepted (``SELECT``, ``FROM …``, ``WITH``,
``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``PRAGMA table_info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt.errors import CatalogError
from tasks.catalog.connections import new_lake_connection, open_file, process_lock
from tasks.catalog.settings import CatalogSettings, lock_timeout_from_env
from tasks.catalog.store import _is_write_refusal

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

_REFUSED = (
    "the catalog is opened read-only by `gptflow sql`; statements that write (INSERT, "
    "UPDATE, DELETE, CREATE, DROP, COPY, ATTACH, ...) are refused."
)


def run_readonly_sql(
    db_path: str | Path | None, sql: str, *, settings: CatalogSettings | None = None
) -> pd.DataFrame:
    """Run a user's query read-only (used by ``gptflow sql``) and return the result.

    ``db_path`` names a DuckDB file; with ``db_path`` and ``settings`` both None the
    environment picks the catalog (:meth:`CatalogSettings.from_env`). File-system access
    from SQL (COPY TO, ATTACH, INSTALL) is disabled. A write statement raises
    :class:`CatalogError`; so does a missing database.
    """
    if settings is None:
        if db_path is not None:
            settings = CatalogSettings(
                path=Path(db_path).expanduser(), lock_timeout=lock_timeout_from_env()
            )
        else:
            settings = CatalogSettings.from_env()
    if settings.is_lake:
        return _lake_sql(settings, sql)
    return _file_sql(settings.file_path(), sql, settings.lock_timeout)


def _run(con: duckdb.DuckDBPyConnection, sql: str, where: str) -> pd.DataFrame:
    import duckdb

    try:
        return con.execute(sql).df()
    except duckdb.Error as exc:
        if _is_write_refusal(exc):
            raise CatalogError(f"{_REFUSED} {where} is unchanged. DuckDB said: {exc}") from exc
        raise CatalogError(f"query failed on {where}: {exc}") from exc


def _file_sql(path: Path, sql: str, timeout: float) -> pd.DataFrame:
    if not path.exists():
        raise CatalogError(
            f"the catalog {path} does not exist yet; run the pipeline first (e.g. "
            "`gptflow run`) or point --db / GPTFLOW_DB at an existing file"
        )
    with process_lock(path):
        con = open_file(
            path, read_only=True, timeout=timeout, config={"enable_external_access": False}
        )
        try:
            return _run(con, sql, str(path))
        finally:
            con.close()


def lock_down(con: duckdb.DuckDBPyConnection, settings: CatalogSettings) -> None:
    """Disable file-system access except to the lake's data, and lock the settings."""
    quoted = str(settings.data_path).replace("'", "''")
    con.execute(f"SET allowed_directories = ['{quoted}']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


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
            if stmt.type != duckdb.StatementType.SELECT:
                kind = str(stmt.type).rsplit(".", 1)[-1]
                raise CatalogError(
                    f"{_REFUSED} {where} is unchanged. On a shared DuckLake only queries "
                    f"(SELECT, DESCRIBE, SHOW, SUMMARIZE) run; this is a {kind} statement"
                )
        return _run(con, sql, where)
    finally:
        con.close()
