"""Rebuild a catalog from the artifacts alone (``gptflow catalog rebuild``).

Replays the run records (``runs/<run_id>.json``) and every committed stage folder's
``rows/`` (and the kept rows of replaced results, ``<key>.history/``) into a catalog;
every step is idempotent. ``sources`` is restored from the run records, the newest
record of each file winning; ``benchmarks`` is not in the artifacts and is kept. A file
target is built beside the old one and swapped in when complete; a DuckLake is filled
in place (:func:`rebuild_into`). A rebuild that would leave fewer rows than the catalog
it replaces is refused unless ``allow_empty`` (docs/catalog.md#rebuild).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpt.errors import CatalogError
from gpt.paths import is_remote
from tasks.catalog import Catalog, CatalogSettings
from tasks.catalog.schema import KNOWN_TABLES
from tasks.catalog.values import quote_ident
from tasks.records.rows import ingest
from tasks.records.run_state import settle_run
from tasks.records.runs import RunRecorder, put_run, typed_row
from tasks.store.roots import local_root, open_stage_store, root_child

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    """What a rebuild read and wrote."""

    runs: int = 0
    stage_rows: int = 0
    folders: int = 0
    history: int = 0
    """Replaced results whose rows were kept (``<key>.history/``)."""
    rows: int = 0
    sources: int = 0
    """Files whose ``sources`` row was restored from the run records."""
    skipped: list[str] = field(default_factory=list)
    """Stage folders left out, with the reason (damaged, unreadable)."""


def rebuild_catalog(
    catalog: Catalog, artifacts: str | Path, *, verify: bool = True
) -> RebuildReport:
    """Replay the run records and every committed stage folder under ``artifacts`` (a
    folder or an object-store URL) into ``catalog`` (created and migrated if needed), on
    one connection (a transaction per run record and per folder)."""
    with catalog.held():
        report = RebuildReport()
        catalog.migrate()
        records = RunRecorder(catalog, root_child(artifacts, "runs")).records()
        report.sources = restore_sources(
            catalog, [row for rec in records for row in (rec.get("sources") or {}).values()]
        )
        for rec in records:
            run = settle_run(rec["run"])  # a run recorded running whose process is gone: crashed
            put_run(catalog, run)
            rows = [typed_row(r) for r in rec.get("stages", {}).values()]
            if rows:
                catalog.replace_rows("stages", rows, where={"run_id": run["run_id"]})
            for table, table_rows in (rec.get("rows") or {}).items():  # e.g. its gates
                catalog.replace_rows(table, table_rows, where={"run_id": run["run_id"]})
            report.runs += 1
            report.stage_rows += len(rows)
        store = open_stage_store(artifacts)
        for entry in store.committed(verify=verify):
            if entry.manifest is None:
                report.skipped.append(entry.problem or f"{entry.where}: unusable")
                continue
            meta = entry.manifest.get("rows") or {}
            if meta:
                try:
                    with store.rows_folder(entry) as folder:
                        report.rows += ingest(catalog, folder, meta)
                except (OSError, CatalogError) as exc:
                    report.skipped.append(f"{entry.where}: {exc}")
                    continue
            if entry.history:
                report.history += 1
            else:
                report.folders += 1
        return report


def restore_sources(catalog: Catalog, rows: list[dict]) -> int:
    """Upsert ``sources`` rows (from run records or another catalog), keeping for each
    file the newest record (by ``fetched_at``) of those given and the one the catalog
    holds. Returns how many rows were written."""
    import pandas as pd

    def when(row: dict) -> pd.Timestamp:
        value = pd.to_datetime(row.get("fetched_at"), errors="coerce")
        return pd.Timestamp.min if pd.isna(value) else value

    have = catalog.query_df("SELECT * FROM sources").to_dict("records")
    newest = {r["name"]: r for r in have}
    changed: dict[str, dict] = {}
    for row in (typed_row(r) for r in rows if r.get("name") and r.get("sha256")):
        old = newest.get(row["name"])
        if old is None or when(row) > when(old):
            newest[row["name"]] = changed[row["name"]] = row
    if changed:
        catalog.upsert_rows("sources", list(changed.values()), key=["name"])
    return len(changed)


#: Tables a rebuild leaves alone: their rows are not in the artifacts.
KEPT_TABLES = frozenset({"sources", "benchmarks"})

#: Tables a rebuild fills (and ``replace`` empties first on a lake).
REBUILT_TABLES = tuple(sorted(KNOWN_TABLES - KEPT_TABLES))

#: Every table of the catalog.
ALL_TABLES = tuple(sorted(KNOWN_TABLES))


def rebuild_into(
    target: CatalogSettings | str | Path,
    artifacts: str | Path,
    *,
    replace: bool = False,
    allow_empty: bool = False,
) -> RebuildReport:
    """Rebuild the catalog ``target`` (settings, or the path of a DuckDB file) from
    ``artifacts`` (module docstring: what ``replace`` means for each kind, and what
    ``allow_empty`` lets through)."""
    settings = target if isinstance(target, CatalogSettings) else CatalogSettings(path=target)
    if count_run_records(artifacts) == 0 and not allow_empty:
        raise CatalogError(
            f"the artifacts {artifacts} hold no run records (runs/*.json): nothing to rebuild "
            "from; check --artifacts (GPTFLOW_ARTIFACTS), or pass --allow-empty to build a "
            "catalog without runs"
        )
    if settings.is_lake:
        return _rebuild_lake(settings, artifacts, replace=replace, allow_empty=allow_empty)
    return _rebuild_file(settings.file_path(), artifacts, replace=replace, allow_empty=allow_empty)


def count_run_records(artifacts: str | Path) -> int:
    """How many run records ``artifacts`` holds; :class:`CatalogError` when a local
    artifacts folder does not exist."""
    if is_remote(artifacts):
        from tasks.store.objects import ObjectRoot

        runs = ObjectRoot(str(root_child(artifacts, "runs")))
        return sum(1 for n in runs.list() if "/" not in n and n.endswith(".json"))
    root = local_root(artifacts)
    if not root.is_dir():
        raise CatalogError(
            f"the artifacts folder {root} does not exist: give the folder holding runs/ and "
            "stages/ with --artifacts (or GPTFLOW_ARTIFACTS); nothing was changed"
        )
    return sum(1 for _ in (root / "runs").glob("*.json"))


def _refuse_emptier(
    location: str, before: dict[str, int], after: dict[str, int], artifacts: str | Path
) -> None:
    """Raise when the rebuilt catalog (``after``) holds fewer rows in some table than
    the one it would replace (``before``)."""
    fewer = {t: (n, after.get(t, 0)) for t, n in sorted(before.items()) if after.get(t, 0) < n}
    if fewer:
        lost = ", ".join(f"{t} {old} -> {new}" for t, (old, new) in fewer.items())
        raise CatalogError(
            f"rebuilding {location} from {artifacts} would leave fewer rows ({lost}); "
            "nothing was changed: check --artifacts, or pass --replace --allow-empty to "
            "replace it anyway"
        )


def _rebuild_file(
    db_path: Path, artifacts: str | Path, *, replace: bool, allow_empty: bool = False
) -> RebuildReport:
    """Build the DuckDB file beside ``db_path``; swap it in when complete and, unless
    ``allow_empty``, when it holds no fewer rows than the file it replaces."""
    db_path = Path(db_path)
    target = Catalog(db_path)
    if target.exists() and not replace:
        which = db_path if db_path.exists() else f"{db_path} (its writers' file {target.live_path})"
        raise CatalogError(
            f"the catalog {which} exists; pass --replace to rebuild it from {artifacts} "
            "(built beside it, swapped in when complete), or --db NEW.duckdb"
        )
    tmp = Catalog(db_path.with_name(f".{db_path.name}.rebuild-{os.getpid()}"))
    assert tmp.path is not None and tmp.live_path is not None
    leftovers = [tmp.path, tmp.live_path, Path(f"{tmp.path}.wal"), Path(f"{tmp.live_path}.wal")]
    for f in leftovers:
        f.unlink(missing_ok=True)
    try:
        report = rebuild_catalog(tmp, artifacts)
        if target.exists():
            before = _carry_kept_tables(target, tmp, report, allow_empty=allow_empty)
            if not allow_empty:
                _refuse_emptier(str(db_path), before, rows_per_table(tmp, ALL_TABLES), artifacts)
        target.install(tmp)
    finally:
        for f in leftovers:
            f.unlink(missing_ok=True)
    return report


def _carry_kept_tables(
    old: Catalog, new: Catalog, report: RebuildReport, *, allow_empty: bool
) -> dict[str, int]:
    """Copy the old file's :data:`KEPT_TABLES` into the rebuilt one (its ``sources``
    merged by date); returns the old file's row counts. An old file that cannot be read
    is refused unless ``allow_empty`` (then nothing is carried)."""
    try:
        before = rows_per_table(old, ALL_TABLES)
        kept = {t: old.query_df(f"SELECT * FROM {quote_ident(t)}") for t in sorted(KEPT_TABLES)}
    except Exception as exc:
        if not allow_empty:
            raise CatalogError(
                f"cannot read the catalog {old.location} to compare it with the rebuilt one "
                f"({' '.join(str(exc).split())[:300]}); pass --replace --allow-empty to "
                "replace it without comparing"
            ) from exc
        report.skipped.append(f"{old.location}: unreadable, nothing carried over ({exc})")
        return {}
    restore_sources(new, kept["sources"].to_dict("records"))
    for table, df in kept.items():
        if table != "sources" and len(df):
            new.insert_rows(table, df)
    return before


def rows_per_table(catalog: Catalog, tables: tuple[str, ...] = REBUILT_TABLES) -> dict[str, int]:
    """Row counts of ``tables`` in ``catalog`` (those holding rows only)."""
    sql = " UNION ALL ".join(
        f"SELECT '{t}' AS t, count(*) AS n FROM {quote_ident(t)}" for t in tables
    )
    df = catalog.query_df(sql)
    return {str(t): int(n) for t, n in zip(df["t"], df["n"], strict=True) if n}


def _rebuild_lake(
    settings: CatalogSettings, artifacts: str | Path, *, replace: bool, allow_empty: bool = False
) -> RebuildReport:
    """Fill the DuckLake in place (idempotent steps); with ``replace`` empty the rebuilt
    tables first, one transaction each — after a trial rebuild into a scratch file holds
    no fewer rows than the lake (unless ``allow_empty``)."""
    import tempfile

    catalog = Catalog(settings=settings)
    catalog.migrate()
    filled = rows_per_table(catalog)
    if filled and not replace:
        held = ", ".join(f"{t} ({n})" for t, n in sorted(filled.items()))
        raise CatalogError(
            f"the catalog {catalog.location} already holds rows in {held}; pass --replace "
            f"to empty those tables and rebuild them from {artifacts} (sources and "
            "benchmarks are kept), or name an empty lake"
        )
    if filled and not allow_empty:
        with tempfile.TemporaryDirectory(prefix="gptflow-rebuild-") as tmp:
            trial = Catalog(Path(tmp) / "trial.duckdb")
            rebuild_catalog(trial, artifacts)
            _refuse_emptier(catalog.location, filled, rows_per_table(trial), artifacts)
    for table in sorted(filled):
        catalog.write(
            f"{table} (emptied for the rebuild)",
            lambda con, t=table: con.execute(f"DELETE FROM {quote_ident(t)}").fetchall(),
        )
        log.info("emptied %s of %s for the rebuild", table, catalog.location)
    return rebuild_catalog(catalog, artifacts)
