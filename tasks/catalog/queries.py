"""Read-only access for people: ``gptflow sql`` runs a user's query on a read-only
connection with file-system access disabled."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt.errors import CatalogError
from gpt.paths import default_db_path
from tasks.catalog.store import (
    _is_write_refusal,
    _lock_timeout_from_env,
    _open_with_retry,
    _process_lock,
)

if TYPE_CHECKING:
    import pandas as pd


def run_readonly_sql(db_path: str | Path | None, sql: str) -> pd.DataFrame:
    """Run a user's query on a read-only connection (used by ``gptflow sql``).

    File-system access from SQL (COPY TO, ATTACH, INSTALL) is disabled too. A write
    statement raises :class:`CatalogError`; so does a missing database.
    """
    import duckdb

    path = Path(db_path).expanduser() if db_path is not None else default_db_path()
    if not path.exists():
        raise CatalogError(
            f"the catalog {path} does not exist yet; run the pipeline first (e.g. "
            "`gptflow run`) or point --db / GPTFLOW_DB at an existing file"
        )
    with _process_lock(path):
        con = _open_with_retry(
            path,
            read_only=True,
            timeout=_lock_timeout_from_env(),
            config={"enable_external_access": False},
        )
        try:
            try:
                return con.execute(sql).df()
            except duckdb.Error as exc:
                if _is_write_refusal(exc):
                    raise CatalogError(
                        f"the catalog is opened read-only by `gptflow sql`; statements that "
                        f"write (INSERT, UPDATE, DELETE, CREATE, DROP, COPY, ATTACH, ...) are "
                        f"refused. {path} is unchanged. DuckDB said: {exc}"
                    ) from exc
                raise CatalogError(f"query failed on {path}: {exc}") from exc
        finally:
            con.close()
