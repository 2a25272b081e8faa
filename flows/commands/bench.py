"""``gptflow bench [--quick] [--only NAME ...] [--json PATH]``: run the benchmark suite,
print a table, store the rows in the catalog's ``benchmarks`` table and a JSON file
under ``artifacts/bench/``.

The benchmarks themselves live in :mod:`benchmarks.suite`; ``pipeline_rerun`` is here because
it needs Prefect (a first ``smoke`` run vs a second identical one, in a throw-away
artifacts/catalog folder so the first run really computes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

ALL = [
    "train_step",
    "generate",
    "generate_batched",
    "spam_finetune",
    "judge",
    "windowing",
    "pipeline_rerun",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    parser = subparsers.add_parser(
        "bench",
        help="run the performance benchmarks (baseline vs optimized, same process)",
        description=(
            "Run each benchmark's baseline and optimized side interleaved in this process, "
            "print a table, append the rows to the catalog's benchmarks table and write "
            "artifacts/bench/<timestamp>.json. --quick shrinks every workload (~1-2 min)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke check)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ALL,
        metavar="NAME",
        default=None,
        help=f"run only these benchmarks ({', '.join(ALL)})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--mirror",
        default=None,
        help="folder with the inputs (tokenizer under gpt2/); default GPTFLOW_MIRROR",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--db", default=None, help="catalog file (default: GPTFLOW_DB or artifacts/gptflow.duckdb)"
    )
    parser.set_defaults(func=run)


def _tokenizer_dir(mirror: str | None) -> Path | None:
    """The GPT-2 tokenizer folder: ``<mirror>/gpt2`` or ``<datasets>/gpt2``."""
    from gpt.paths import datasets_dir

    candidates = []
    if mirror and not mirror.startswith(("http://", "https://")):
        candidates.append(Path(mirror).expanduser() / "gpt2")
    candidates.append(datasets_dir() / "gpt2")
    for c in candidates:
        if (c / "encoder.json").is_file() and (c / "vocab.bpe").is_file():
            return c
    return None


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0 or 0.01 <= abs(x) < 1e5:
            return f"{x:.3g}" if abs(x) < 10 else f"{x:,.1f}"
        return f"{x:.3g}"
    return str(x)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark rows."""
    head = ["name", "baseline", "optimized", "ratio", "unit", "target", "met"]
    cells = [
        [
            r["name"],
            _fmt(r["baseline"]),
            _fmt(r["optimized"]),
            (_fmt(r["ratio"]) + "x") if r["ratio"] is not None else "-",
            r["unit"],
            r["target"],
            _fmt(r["met"]),
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)
    ]
    right = {1, 2, 3}

    def line(vals: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def bench_pipeline_rerun(mirror: str | None, quick: bool = False) -> Any:
    """First ``smoke`` pipeline run vs a second identical run (all cache hits), in a
    fresh artifacts/datasets/catalog folder against the local Prefect server."""
    import tempfile
    import time

    from benchmarks.suite import BenchResult, BenchSkipped, _load_ollama_stub

    mirror = mirror or os.environ.get("GPTFLOW_MIRROR")
    if not mirror:
        raise BenchSkipped(
            "pipeline_rerun needs the inputs offline: pass --mirror FOLDER or set GPTFLOW_MIRROR"
        )
    if not mirror.startswith(("http://", "https://")) and not Path(mirror).is_dir():
        raise BenchSkipped(f"pipeline_rerun: mirror folder {mirror} does not exist")
    from flows.server import ensure_server

    ensure_server()  # the user's server, before the env points elsewhere
    from flows.pipeline import run_pipeline

    stub = _load_ollama_stub()(models=["llama3"], reply=lambda req: "Score: 80")
    stub.start()
    keys = ("GPTFLOW_ARTIFACTS", "GPTFLOW_DATASETS", "GPTFLOW_DB")
    old = {k: os.environ.get(k) for k in keys}
    results, times = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="gptflow-bench-pipe-") as tmp:
            os.environ["GPTFLOW_ARTIFACTS"] = str(Path(tmp) / "artifacts")
            os.environ["GPTFLOW_DATASETS"] = str(Path(tmp) / "datasets")
            os.environ["GPTFLOW_DB"] = str(Path(tmp) / "catalog.duckdb")
            for _ in range(2):
                t0 = time.perf_counter()
                res = run_pipeline(
                    "smoke", [f"judge.hosts={stub.host}"], mirror=mirror, progress=False
                )
                times.append(time.perf_counter() - t0)
                results.append(res)
                if res["status"] != "completed":
                    raise RuntimeError(
                        f"the smoke run failed ({res.get('error')}); stages: {res.get('stages')}"
                    )
    finally:
        stub.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stages2 = results[1]["stages"]
    recomputed = sorted(s for s, info in stages2.items() if not info.get("cache_hit"))
    fraction = times[1] / times[0]
    return BenchResult(
        name="pipeline_rerun",
        baseline=times[0],
        optimized=times[1],
        ratio=times[0] / times[1],
        unit="s",
        details={
            "profile": "smoke",
            "second_run_fraction": fraction,
            "stages": len(stages2),
            "recomputed": recomputed,
            "n_recomputed": len(recomputed),
            "run_ids": [r["run_id"] for r in results],
            "quick": quick,
        },
        target="second run <= 10% of the first, 0 stages recomputed",
        met=fraction <= 0.10 and not recomputed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the selected benchmarks; 0 when all ran (targets missed are reported, not
    failures), 1 when a benchmark crashed."""
    import datetime as dt
    import json
    import logging
    import traceback

    import torch

    from benchmarks import suite as bench
    from gpt.fileio import atomic_open
    from gpt.paths import artifacts_dir
    from tasks.catalog import Catalog

    log = logging.getLogger("gptflow.bench")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or ALL
    mirror = args.mirror or os.environ.get("GPTFLOW_MIRROR")
    tok_dir = _tokenizer_dir(mirror)
    hw = bench.hardware()
    print(
        f"gptflow bench{' --quick' if args.quick else ''}: {hw['cpu']}, {hw['cores']} cores, "
        f"torch {hw['torch']} ({hw['threads']} threads), device {hw['device']}"
        + (f" {hw.get('cuda_name')}" if hw.get("cuda_name") else ""),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    crashed = 0
    now = dt.datetime.now(dt.UTC)
    for name in names:
        t0 = dt.datetime.now(dt.UTC)
        print(f"  running {name} ...", flush=True)
        try:
            if name == "pipeline_rerun":
                res = bench_pipeline_rerun(mirror, args.quick)
            else:
                res = bench.run_benchmark(name, args.quick, tokenizer_dir=tok_dir)
        except bench.BenchSkipped as exc:
            notes.append(f"{name}: skipped: {exc}")
            print(f"  {name}: skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # report and go on with the other benchmarks
            crashed += 1
            log.debug("benchmark %s failed", name, exc_info=True)
            notes.append(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            print(f"  {name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            continue
        elapsed = (dt.datetime.now(dt.UTC) - t0).total_seconds()
        row = res.to_dict()
        row["details"] = {**row["details"], "bench_seconds": elapsed}
        rows.append(row)
        print(
            f"  {name}: {_fmt(res.baseline)} -> {_fmt(res.optimized)} {res.unit} "
            f"({_fmt(res.ratio)}x, {elapsed:.0f}s)",
            flush=True,
        )

    print()
    print(format_table(rows))
    if args.quick:
        print("note: --quick runs tiny shapes; the targets are meant for the full run")
    for n in notes:
        print(f"note: {n}")

    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "time": now.isoformat(),
        "quick": bool(args.quick),
        "hardware": hw,
        "results": rows,
        "notes": notes,
    }
    text = json.dumps(payload, indent=2, default=str)
    out_dir = artifacts_dir() / "bench"
    paths = [out_dir / f"{stamp}.json"] + ([args.json] if args.json else [])
    for path in paths:
        with atomic_open(Path(path), "w") as f:
            f.write(text)
    if rows:
        catalog = Catalog(args.db)
        catalog.insert_rows(
            "benchmarks",
            [
                {
                    "name": r["name"],
                    "baseline": r["baseline"],
                    "optimized": r["optimized"],
                    "ratio": r["ratio"],
                    "unit": r["unit"],
                    "hardware": hw,
                    "details": {
                        **r["details"],
                        "target": r["target"],
                        "met": r["met"],
                        "quick": bool(args.quick),
                    },
                    "time": now,
                }
                for r in rows
            ],
        )
        print(f"wrote {len(rows)} row(s) to {catalog.path} (benchmarks) and {paths[0]}")
    else:
        print(f"no benchmark ran; wrote {paths[0]}")
    return 1 if crashed else 0
