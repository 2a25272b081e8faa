"""Rebuild a catalog from the artifacts alone (``gptflow catalog rebuild``).

The artifacts hold everything the catalog indexes: the run records
(``artifacts/runs/<run_id>.json``: the ``runs`` and ``stages`` rows) and the stage folders
(``artifacts/stages/<stage>/<key>/``: ``rows/<table>.parquet`` listed in the manifest).
Rebuilding replays both into a fresh catalog; every step is idempotent, so it can also
fill in a catalog that lacks some rows. The artifacts may be on an object store
(``s3://…``): then only the ``rows/`` files of each published folder are downloaded.

Rows of results that a recomputation replaced (a forced stage, a damaged folder) were
kept beside the folder (``<key>.history/``) and are replayed too. Not rebuilt:
``sources`` (download provenance; the next run records it again), ``benchmarks``, and
rows of stages that never finished (their ``.partial`` folders).

Two kinds of target (:func:`rebuild_into`):

* **the DuckDB file**: a new file is built beside the old one and swapped in only when
  complete (an existing file is refused unless ``replace``);
* **a DuckLake** (``ducklake:postgres:…`` + data path): there is no file to swap, and
  every step is idempotent, so the rebuild fills the lake in place. A lake whose rebuilt
  tables hold rows is refused unless ``replace``, which first empties those tables, one
  transaction per table. ``sources`` and ``benchmarks`` are kept (they cannot be rebuilt
  and other machines may rely on the download digests); so is the schema.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpt.errors import CatalogError
from gpt.paths import is_remote
from tasks.cache import StageStore, local_root, root_child, verify_files
from tasks.catalog import Catalog, CatalogSettings
from tasks.catalog.schema import KNOWN_TABLES
from tasks.catalog.values import quote_ident
from tasks.distributed import SCRATCH_SUFFIX
from tasks.rows import ingest
from tasks.run_state import settle_run
from tasks.runlog import typed_row

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
    skipped: list[str] = field(default_factory=list)
    """Stage folders left out, with the reason (damaged, unreadable)."""


def _sorted_records(records: list[dict]) -> list[dict]:
    records = [r for r in records if isinstance(r, dict) and r.get("run")]
    return sorted(records, key=lambda r: (r["run"].get("started_at") or "", r["run"]["run_id"]))


def _run_records(runs_dir: Path) -> list[dict]:
    records = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable run record %s: %s", path, exc)
            continue
        records.append(rec)
    return _sorted_records(records)


def _remote_run_records(url: str) -> list[dict]:
    from tasks.storage import ObjectRoot

    root = ObjectRoot(url)
    records = []
    for name in sorted(root.list()):
        if "/" in name or not name.endswith(".json"):
            continue
        got = root.get(name)
        try:
            records.append(json.loads(got.data) if got is not None else None)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("skipping unreadable run record %s: %s", root.url_of(name), exc)
    return _sorted_records(records)


def rebuild_catalog(
    catalog: Catalog, artifacts: str | Path, *, verify: bool = True
) -> RebuildReport:
    """Replay the run records and every committed stage folder under ``artifacts`` (a
    folder or an object-store URL) into ``catalog`` (created and migrated if needed)."""
    report = RebuildReport()
    catalog.migrate()
    remote = is_remote(artifacts)
    if remote:
        records = _remote_run_records(str(root_child(artifacts, "runs")))
    else:
        artifacts = local_root(artifacts)
        records = _run_records(artifacts / "runs")
    for rec in records:
        run = settle_run(rec["run"])  # a run recorded running whose process is gone: crashed
        catalog.upsert_rows("runs", [typed_row(run)], key=["run_id"])
        rows = [typed_row(r) for r in rec.get("stages", {}).values()]
        if rows:
            catalog.replace_rows("stages", rows, where={"run_id": run["run_id"]})
        for table, table_rows in (rec.get("rows") or {}).items():  # e.g. its gates
            catalog.replace_rows(table, table_rows, where={"run_id": run["run_id"]})
        report.runs += 1
        report.stage_rows += len(rows)
    if remote:
        _replay_remote_folders(catalog, str(artifacts), report)
        return report
    store = StageStore(Path(artifacts) / "stages")
    if store.root.is_dir():
        for folder in sorted(p for p in store.root.glob("*/*") if p.is_dir()):
            skip = (".partial", ".history", SCRATCH_SUFFIX)
            if folder.name.endswith(skip) or ".old-" in folder.name:
                continue
            manifest = store.read_manifest(folder)
            if manifest is None:
                report.skipped.append(f"{folder}: no readable manifest")
                continue
            if verify:
                problem = verify_files(folder, manifest.get("files", {}))
                if problem:
                    report.skipped.append(f"{folder}: {problem}")
                    continue
            meta = manifest.get("rows") or {}
            if meta:
                report.rows += ingest(catalog, folder, meta)
            report.folders += 1
        # rows of results a recomputation replaced (another producer's: history)
        for entry in sorted(store.root.glob("*/*.history/*/manifest.json")):
            try:
                old = json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                report.skipped.append(f"{entry.parent}: unreadable manifest")
                continue
            if old.get("rows"):
                report.rows += ingest(catalog, entry.parent, old["rows"])
                report.history += 1
    return report


def _replay_remote_folders(catalog: Catalog, url: str, report: RebuildReport) -> None:
    """Ingest the rows of every published stage folder whose objects match its manifest
    (only ``rows/`` is downloaded, into a temporary folder, and checked by sha256)."""
    import tempfile

    from tasks.remote_store import ObjectStageStore

    store = ObjectStageStore(url)
    for stage, key, manifest, problem in store.published_folders():
        if manifest is None:
            report.skipped.append(problem or f"{store.published(stage, key)}: unusable")
            continue
        meta = manifest.get("rows") or {}
        if meta:
            with tempfile.TemporaryDirectory(prefix="gptflow-rebuild-") as tmp:
                problem = store.fetch_rows(stage, key, manifest, Path(tmp))
                if problem:
                    report.skipped.append(problem)
                    continue
                report.rows += ingest(catalog, Path(tmp), meta)
        report.folders += 1
    for prefix, old in store.history():  # rows of results a recomputation replaced
        with tempfile.TemporaryDirectory(prefix="gptflow-rebuild-") as tmp:
            try:
                store.fetch_history_rows(prefix, old, Path(tmp))
                report.rows += ingest(catalog, Path(tmp), old["rows"])
            except (OSError, CatalogError) as exc:
                report.skipped.append(f"{store.remote.url_of(prefix)}: {exc}")
                continue
        report.history += 1


#: Tables a rebuild leaves alone: their rows are not in the artifacts.
KEPT_TABLES = frozenset({"sources", "benchmarks"})

#: Tables a rebuild fills (and ``replace`` empties first on a lake).
REBUILT_TABLES = tuple(sorted(KNOWN_TABLES - KEPT_TABLES))


def rebuild_into(
    target: CatalogSettings | str | Path, artifacts: str | Path, *, replace: bool = False
) -> RebuildReport:
    """Rebuild the catalog ``target`` (settings, or the path of a DuckDB file) from
    ``artifacts`` (module docstring: what ``replace`` means for each kind)."""
    settings = target if isinstance(target, CatalogSettings) else CatalogSettings(path=target)
    if settings.is_lake:
        return _rebuild_lake(settings, artifacts, replace=replace)
    return _rebuild_file(settings.file_path(), artifacts, replace=replace)


def _rebuild_file(db_path: Path, artifacts: str | Path, *, replace: bool) -> RebuildReport:
    """Build the DuckDB file beside ``db_path``; swap it in when complete."""
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
        target.install(tmp)
    finally:
        for f in leftovers:
            f.unlink(missing_ok=True)
    return report


def rows_per_table(catalog: Catalog, tables: tuple[str, ...] = REBUILT_TABLES) -> dict[str, int]:
    """Row counts of ``tables`` in ``catalog`` (those holding rows only)."""
    sql = " UNION ALL ".join(
        f"SELECT '{t}' AS t, count(*) AS n FROM {quote_ident(t)}" for t in tables
    )
    df = catalog.query_df(sql)
    return {str(t): int(n) for t, n in zip(df["t"], df["n"], strict=True) if n}


def _rebuild_lake(
    settings: CatalogSettings, artifacts: str | Path, *, replace: bool
) -> RebuildReport:
    """Fill the DuckLake in place (idempotent steps); with ``replace`` empty the rebuilt
    tables first, one transaction each."""
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
    for table in sorted(filled):
        catalog.write(
            f"{table} (emptied for the rebuild)",
            lambda con, t=table: con.execute(f"DELETE FROM {quote_ident(t)}").fetchall(),
        )
        log.info("emptied %s of %s for the rebuild", table, catalog.location)
    return rebuild_catalog(catalog, artifacts)
