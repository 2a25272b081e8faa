"""How the catalog behaves after a year of scheduled runs: ``python -m benchmarks.catalog_growth``.

Builds the year of :mod:`benchmarks.catalog_year` (469 runs: 365 nightly, 52 reruns, 52
re-scorings) in a scratch folder, half first and then the rest, and measures:

* **growth**: file size and rows per table after each half, so bytes and rows per run;
* **query commands** (``gptflow runs``, ``runs RUN``, ``evals``, ``evals --run RUN``,
  ``compare A B``, ``report RUN``) on the published file, in one child process (so the
  figures are the commands' own work, not Python's imports): the first call of each
  (cold: the process has not read the file yet) and the median of the next ones;
* **views**: each view whole (``count(*)``) and one run's rows;
* **rebuild**: ``catalog rebuild`` from artifacts exported from the catalog (run records
  and stage folders with their ``rows/*.parquet``, as runs leave them), for the first
  half and for the whole year, so the time per run can be compared.

Every figure goes into a results JSON (``benchmarks/results/catalog-year-<UTC>.json``).
``--nightly N`` builds a smaller year for a quick check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.catalog_rows import CPU_RUN
from benchmarks.catalog_year import PlannedRun, YearPlan, build_catalog, judge_keys

REPO = Path(__file__).resolve().parents[1]

#: The tables each stage's folder holds rows of (what ``tasks.records.rows.SCOPES`` scopes).
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "tokenize": ("corpus", "spam_examples", "instructions"),
    "pretrain": ("metrics", "samples", "checkpoints"),
    "load_gpt2": ("metrics", "samples", "checkpoints"),
    "finetune_spam": ("metrics", "checkpoints", "predictions"),
    "baseline_spam": ("baselines", "predictions"),
    "finetune_instruct": ("metrics", "samples", "checkpoints"),
    "extract_responses": ("responses",),
    "judge": ("judgments",),
}

#: The child process timing the commands (it imports the CLI; this module does not).
_DRIVER = r"""
import contextlib, io, json, statistics, sys, time
from flows.cli import main
commands, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for name, argv in commands:
    times = []
    for _ in range(1 + repeats):
        sink = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            rc = main(argv)
        times.append(time.perf_counter() - t)
        if rc not in (0, None):
            raise SystemExit(f"{name}: exit {rc}")
    out[name] = {"cold_s": times[0], "median_s": statistics.median(times[1:]),
                 "min_s": min(times[1:]), "max_s": max(times[1:]), "repeats": repeats,
                 "output_chars": len(sink.getvalue())}
print(json.dumps(out))
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _select(table: str, where: dict[str, Any]) -> str:
    return f"SELECT * FROM {table} WHERE " + " AND ".join(f'"{k}" = ?' for k in where)


def export_artifacts(cat: Any, runs: list[PlannedRun], root: Path) -> int:
    """Write what ``runs`` leave in the artifacts: a run record each
    (``runs/<id>.json``) and a folder per computed stage (``stages/<stage>/<key>/``:
    a manifest and ``rows/<table>.parquet``), from the rows of ``cat``. Returns the
    number of stage folders."""
    from benchmarks.catalog_rows import key

    (root / "runs").mkdir(parents=True, exist_ok=True)
    folders = 0
    with cat.connect(read_only=True) as con:
        for run in runs:
            rid = run.run_id
            record: dict[str, Any] = {"run": _records(con, "runs", rid)[0]}
            record["stages"] = {r["stage"]: r for r in _records(con, "stages", rid)}
            record["rows"] = {"gates": _records(con, "gates", rid)}
            (root / "runs" / f"{rid}.json").write_text(json.dumps(record, default=str))
            for stage, row in record["stages"].items():
                if stage not in STAGE_TABLES or row["cache_hit"] is not False:
                    continue  # computed by another run, or never finished
                scored = run.base if run.kind == "rescore" else rid
                folder = root / "stages" / stage / key("key", rid, stage)
                meta: dict[str, Any] = {}
                for table in STAGE_TABLES[stage]:
                    where: dict[str, Any] = {"run_id": scored if stage == "judge" else rid}
                    if table in ("metrics", "samples", "checkpoints", "predictions"):
                        where["stage"] = stage
                    scopes = [where]
                    if table == "judgments":
                        scopes = [{**where, "judge_key": k} for k in set(judge_keys(run).values())]
                    sql = " UNION ALL ".join(_select(table, s) for s in scopes)
                    params = [v for s in scopes for v in s.values()]
                    (folder / "rows").mkdir(parents=True, exist_ok=True)
                    path = folder / "rows" / f"{table}.parquet"
                    n = con.execute(
                        f"COPY ({sql}) TO '{path}' (FORMAT parquet)", params
                    ).fetchone()[0]
                    meta[table] = {"n": n, "scopes": scopes}
                files = {
                    f"rows/{p.name}": {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in sorted((folder / "rows").glob("*.parquet"))
                }
                manifest = {"version": 2, "stage": stage, "files": files, "rows": meta}
                (folder / "manifest.json").write_text(json.dumps(manifest))
                folders += 1
    return folders


def _records(con: Any, table: str, run_id: str) -> list[dict[str, Any]]:
    cur = con.execute(f"SELECT * FROM {table} WHERE run_id = ?", [run_id])
    names = [d[0] for d in cur.description]
    out = []
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        out.append(
            {k: (v.isoformat(sep=" ") if isinstance(v, dt.datetime) else v) for k, v in row.items()}
        )
    return out


def _file_bytes(cat: Any) -> int:
    """Bytes of the catalog's live file after a checkpoint (its WAL folded in)."""
    with cat.connect() as con:
        con.execute("CHECKPOINT")
    return cat.live_path.stat().st_size


def _table_rows(cat: Any) -> dict[str, int]:
    from tasks.catalog.schema import KNOWN_TABLES
    from tasks.records.rebuild import rows_per_table

    return rows_per_table(cat, tuple(sorted(KNOWN_TABLES)))


def time_commands(db: Path, runs: list[PlannedRun], repeats: int) -> dict[str, Any]:
    """The query commands, timed in one child process (see :data:`_DRIVER`)."""
    nightly = [r for r in runs if r.kind == "nightly" and not r.failed]
    a, b = nightly[-2].run_id, nightly[-1].run_id
    d = ["--db", str(db)]
    commands = [
        ("runs", ["runs", *d]),
        ("runs RUN", ["runs", b, *d]),
        ("evals", ["evals", *d]),
        ("evals --run RUN", ["evals", "--run", b, *d]),
        ("compare A B", ["compare", a, b, *d]),
        ("report RUN", ["report", b, *d]),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands), str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"timing the commands failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_views(cat: Any, run_id: str, repeats: int) -> dict[str, Any]:
    """Each view whole and for one run: median seconds of ``repeats`` after a warm-up."""
    from tasks.catalog.views import VIEWS

    out: dict[str, Any] = {}
    with cat.connect(read_only=True) as con:
        for view in VIEWS:
            entry: dict[str, Any] = {}
            for label, sql, params in (
                ("all_s", f"SELECT count(*) FROM {view}", []),
                ("one_run_s", f"SELECT * FROM {view} WHERE run_id = ?", [run_id]),
            ):
                times = []
                for _ in range(1 + repeats):
                    t = time.perf_counter()
                    con.execute(sql, params).fetchall()
                    times.append(time.perf_counter() - t)
                entry[label] = statistics.median(times[1:])
            entry["rows"] = con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
            out[view] = entry
    return out


def time_rebuild(artifacts: Path, db: Path) -> dict[str, Any]:
    """``catalog rebuild`` of ``artifacts`` into a new file ``db``."""
    from tasks.records.rebuild import rebuild_into

    t, c = time.perf_counter(), time.process_time()
    report = rebuild_into(db, artifacts)
    return {
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - c,
        "runs": report.runs,
        "folders": report.folders,
        "rows": report.rows,
        "skipped": len(report.skipped),
    }


def machine() -> dict[str, Any]:
    """The CPU this ran on and the load around it (the machine may be shared)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def run(nightly: int, repeats: int, work: Path) -> dict[str, Any]:
    """The whole benchmark (module docstring) in ``work``; returns the results."""
    import duckdb

    from tasks.catalog import Catalog

    plan = YearPlan().scaled(nightly) if nightly != YearPlan.nightly else YearPlan()
    runs = plan.runs()
    half = len(runs) // 2
    cat = Catalog(work / "year.duckdb")
    growth = []
    built = 0
    for upto in (half, len(runs)):
        t, c = time.perf_counter(), time.process_time()
        build_catalog(cat, runs[built:upto], progress=True)
        growth.append(
            {
                "runs": upto,
                "build_wall_s": time.perf_counter() - t,
                "build_cpu_s": time.process_time() - c,
                "file_bytes": _file_bytes(cat),
                "rows": _table_rows(cat),
            }
        )
        built = upto
    cat.publish()
    (h, f) = growth
    per_run = {
        "bytes": (f["file_bytes"] - h["file_bytes"]) / (f["runs"] - h["runs"]),
        "rows": {
            t: (n - h["rows"].get(t, 0)) / (f["runs"] - h["runs"]) for t, n in f["rows"].items()
        },
    }
    print("timing the commands", flush=True)
    commands = time_commands(cat.path, runs, repeats)
    last = [r for r in runs if r.kind == "nightly" and not r.failed][-1].run_id
    print("timing the views", flush=True)
    views = time_views(Catalog(cat.path, snapshot=True), last, repeats)
    print("exporting artifacts and rebuilding", flush=True)
    rebuild = []
    for upto in (half, len(runs)):
        art = work / f"artifacts-{upto}"
        folders = export_artifacts(cat, runs[:upto], art)
        entry = time_rebuild(art, work / f"rebuilt-{upto}.duckdb")
        entry.update(runs_planned=upto, folders_exported=folders)
        entry["s_per_run"] = entry["wall_s"] / upto
        rebuild.append(entry)
        shutil.rmtree(art)
        print(f"rebuild of {upto} runs: {entry['wall_s']:.1f} s", flush=True)
    half_rb, full_rb = rebuild
    linearity = (full_rb["cpu_s"] / full_rb["runs"]) / (half_rb["cpu_s"] / half_rb["runs"])
    return {
        "benchmark": "catalog_year",
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "duckdb": duckdb.__version__,
        "plan": {
            "nightly": plan.nightly,
            "weekly_reruns": plan.weekly_reruns,
            "rescorings": plan.rescorings,
            "runs": len(runs),
        },
        "growth": growth,
        "per_run": per_run,
        "commands": commands,
        "views": views,
        "rebuild": rebuild,
        "rebuild_cpu_per_run_full_over_half": linearity,
        "rows_per_computed_run": CPU_RUN,
        "targets": {"query_command_s": 1.0, "rebuild": "linear in runs"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nightly", type=int, default=YearPlan.nightly, help="nights in the year")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    p.add_argument(
        "--out",
        type=Path,
        help="results JSON (default: benchmarks/results/catalog-year-<UTC>.json)",
    )
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptflow-catalog-year-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args.nightly, args.repeats, work)
    stamp = results["created_at"].replace("-", "").replace(":", "")
    out = args.out or REPO / "benchmarks" / "results" / f"catalog-year-{stamp}.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    keys = ("commands", "per_run", "rebuild", "rebuild_cpu_per_run_full_over_half")
    print(json.dumps({k: results[k] for k in keys}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
