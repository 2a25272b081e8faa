"""Bringing a catalog to the schema this code writes, on an open write connection.

The ``schema_version`` table records which steps of :data:`~tasks.catalog.schema.MIGRATIONS`
were applied; each missing step runs in its own transaction, and the one that reaches
:data:`~tasks.catalog.schema.SCHEMA_VERSION` also (re)creates every view
(:mod:`tasks.catalog.views`). :meth:`~tasks.catalog.store.Catalog.migrate` re-runs the
whole thing when another writer of a lake wins a race.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from gpt.errors import CatalogError
from tasks.catalog.schema import SCHEMA_VERSION, lake_ddl, migration_step
from tasks.catalog.values import utcnow
from tasks.catalog.views import view_statements

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the catalog (0 without a ``schema_version`` table)."""
    exists = con.execute(  # duckdb_tables(): ~2 ms; information_schema.tables: ~12 ms
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = 'schema_version'"
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_version(con: duckdb.DuckDBPyConnection, location: str) -> int:
    """The recorded schema version; :class:`CatalogError` when a newer gptflow wrote it."""
    version = current_version(con)
    if version > SCHEMA_VERSION:
        raise CatalogError(
            f"the catalog {location} has schema version {version}, newer than this "
            f"gptflow knows ({SCHEMA_VERSION}); upgrade gptflow or use another --db / "
            "GPTFLOW_DB / GPTFLOW_CATALOG_URL"
        )
    return version


def apply_steps(con: duckdb.DuckDBPyConnection, target: int, *, lake: bool, location: str) -> int:
    """Apply the missing steps up to ``target``, one transaction each (the views with the
    step that reaches the newest version); returns the version reached."""
    version = check_version(con, location)
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)")
    for step in range(version, target):
        con.execute("BEGIN TRANSACTION")
        try:
            if current_version(con) > step:  # another process applied it
                con.execute("ROLLBACK")
                continue
            for stmt in migration_step(step, lake=lake):
                con.execute(stmt)
            if step + 1 == SCHEMA_VERSION:
                for stmt in view_statements():
                    con.execute(lake_ddl(stmt) if lake else stmt)
            con.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                [step + 1, utcnow()],
            )
            con.execute("COMMIT")
        except Exception:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            raise
        log.info("catalog %s migrated to schema version %d", location, step + 1)
    return max(version, target)
