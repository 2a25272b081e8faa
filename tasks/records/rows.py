"""A stage's catalog rows, kept in its folder: the catalog is an index of the artifacts.

While a stage computes, :class:`RowSink` appends its rows to ``.rows/<table>.jsonl`` in
the work folder (a resumed attempt keeps them) and writes live tables (training
metrics) to the catalog at once. At commit they become ``rows/<table>.parquet``, typed
by the catalog's own schema in an in-memory DuckDB, and are ingested in one
transaction. Ingesting replaces the rows of the table's *scope* (e.g. one run and
stage), so it is idempotent (:func:`ensure_ingested`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError
from tasks.catalog.values import sql_str
from tasks.jsonable import plain
from tasks.store.manifest import ROWS_DIR

if TYPE_CHECKING:
    import duckdb

    from tasks.catalog import Catalog

#: For each table a stage may write: the columns whose values identify that stage's rows.
SCOPES: dict[str, tuple[str, ...]] = {
    "metrics": ("run_id", "stage"),
    "samples": ("run_id", "stage"),
    "checkpoints": ("run_id", "stage"),
    "corpus": ("run_id",),
    "spam_examples": ("run_id",),
    "instructions": ("run_id",),
    "sms_messages": ("source_sha256",),
    "baselines": ("run_id",),
    "responses": ("run_id",),
    "judgments": ("run_id", "judge_key"),
    "predictions": ("run_id", "stage"),
}

#: Rows sent again after a resume replace earlier ones with the same key.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "metrics": ("run_id", "stage", "step", "split", "name"),
    "samples": ("run_id", "stage", "epoch", "step"),
    "judgments": ("run_id", "judge_key", "judge_model", "example_id", "repeat"),
}

PARTIAL_DIR = ".rows"


def _scopes_of(table: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct scope values of ``rows`` (usually one: one run, one stage)."""
    cols = SCOPES[table]
    seen = {tuple(r.get(c) for c in cols): None for r in rows}
    return [dict(zip(cols, values, strict=True)) for values in seen]


class RowSink:
    """Collects a stage's rows in its work folder (and, when asked, in the catalog now)."""

    def __init__(self, work: Path, catalog: Catalog | None = None) -> None:
        self.work = Path(work)
        self.catalog = catalog

    def add(self, table: str, rows: Sequence[Mapping[str, Any]], *, live: bool = False) -> None:
        """Append ``rows`` to ``table``'s buffer; ``live`` also upserts them into the
        catalog now (so e.g. training curves can be watched while a stage runs)."""
        if table not in SCOPES:
            raise CatalogError(f"stages do not write table {table!r}; known: {sorted(SCOPES)}")
        if not rows:
            return
        path = self.work / PARTIAL_DIR / f"{table}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(plain(dict(r))) + "\n")
            f.flush()
        if live and self.catalog is not None:
            key = ROW_KEYS.get(table)
            if key:
                self.catalog.upsert_rows(table, list(rows), key=list(key))
            else:
                self.catalog.insert_rows(table, list(rows))

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every buffered row per table, later rows replacing earlier ones with the same
        :data:`ROW_KEYS` key."""
        out: dict[str, list[dict[str, Any]]] = {}
        folder = self.work / PARTIAL_DIR
        if not folder.is_dir():
            return out
        for path in sorted(folder.glob("*.jsonl")):
            table = path.stem
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed write
                    continue
            key = ROW_KEYS.get(table)
            if key:
                rows = list({tuple(r.get(k) for k in key): r for r in rows}.values())
            if rows:
                out[table] = rows
        return out

    def write_parquet(self) -> dict[str, dict[str, Any]]:
        """Turn the buffers into ``rows/<table>.parquet``; returns
        ``{table: {"n": rows, "scopes": [scope values]}}`` for the manifest."""
        written: dict[str, dict[str, Any]] = {}
        tables = self.rows()
        if not tables:
            return written
        out_dir = self.work / ROWS_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        con = _schema_connection()
        try:
            for table, rows in tables.items():
                scopes = _scopes_of(table, rows)
                _load_into(con, table, rows)
                path = out_dir / f"{table}.parquet"
                tmp = path.with_suffix(".parquet.tmp")
                con.execute(f"COPY {table} TO {sql_str(str(tmp))} (FORMAT parquet)")
                tmp.replace(path)
                con.execute(f"DELETE FROM {table}")
                written[table] = {"n": len(rows), "scopes": scopes}
        finally:
            con.close()
        return written


def _schema_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding the catalog's schema (tables typed as the catalog)."""
    import duckdb

    from tasks.catalog.schema import MIGRATIONS

    con = duckdb.connect()
    for stmt in (stmt for step in MIGRATIONS for stmt in step):
        con.execute(stmt)
    return con


def _load_into(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows the way the catalog does (same normalisation and casts)."""
    from tasks.catalog.tables import insert_typed, table_columns, typed_rows

    cols = table_columns(con, table)
    insert_typed(con, table, typed_rows(table, rows, cols, "(in-memory rows)"), cols)


def _scope(table: str, scope: Mapping[str, Any]) -> dict[str, Any]:
    """A scope as recorded in a manifest, with the scope columns added since (e.g.
    ``judge_key``) as NULL: a folder written before a column existed holds rows where
    it is NULL, and replacing its scope must not touch rows that have one."""
    return {**{c: None for c in SCOPES.get(table, ()) if c not in scope}, **scope}


def ingest(catalog: Catalog, folder: Path, rows_meta: Mapping[str, Mapping[str, Any]]) -> int:
    """Replace each table's scope with the folder's rows, all in one transaction."""
    items = [
        (
            table,
            folder / ROWS_DIR / f"{table}.parquet",
            [_scope(table, s) for s in meta["scopes"]],
        )
        for table, meta in sorted(rows_meta.items())
    ]
    return catalog.replace_from_parquet(items) if items else 0


def missing_tables(catalog: Catalog, rows_meta: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Tables whose scope in the catalog does not hold the folder's row count."""
    from tasks.catalog.tables import check_table, match_any

    if not rows_meta:
        return []
    if not catalog.exists():
        return sorted(rows_meta)
    counts, params = [], []
    for table, meta in sorted(rows_meta.items()):
        check_table(table)
        cond, values = match_any(_scope(table, x) for x in meta["scopes"])
        counts.append(f"SELECT '{table}' AS t, count(*) AS n FROM {table} WHERE {cond}")
        params += values
    try:  # one query for every table
        have = {r["t"]: int(r["n"]) for r in catalog.query_rows(" UNION ALL ".join(counts), params)}
    except CatalogError:
        have = {}  # a table missing (an older schema): ingesting migrates first
    return [t for t, meta in sorted(rows_meta.items()) if have.get(t, -1) != int(meta["n"])]


def ensure_ingested(
    catalog: Catalog, folder: Path, rows_meta: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Ingest the folder's rows when the catalog lacks them; returns the tables ingested."""
    missing = missing_tables(catalog, rows_meta)
    if missing:
        ingest(catalog, folder, rows_meta)
    return missing
