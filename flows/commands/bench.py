"""``gptflow bench [--quick] [--only NAME ...] [--vs-book] [--json PATH]``: run the
benchmark suite, print a table, store the rows in the catalog's ``benchmarks`` table and a
JSON file under ``artifacts/bench/`` (render it as the docs/performance.md tables with
``python -m benchmarks.render FILE``).

The benchmarks live in :mod:`benchmarks` (registry: :mod:`benchmarks.suite`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.names import ALL, SUITE, VS_BOOK
from flows.commands import add_db_arg, print_df
from flows.report import fmt

if TYPE_CHECKING:
    import pandas as pd


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the performance benchmarks (baseline vs optimized, same process)",
        description=(
            "Run each benchmark's baseline and optimized side interleaved in this process "
            "after a warm-up, several repeats each, print a table, append the rows to the "
            "catalog's benchmarks table and write artifacts/bench/<timestamp>.json. "
            "--quick shrinks every workload (a smoke check). --vs-book adds the side-by-side "
            "comparisons with the book's own package (pip install --no-deps "
            "llms-from-scratch==1.0.19)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke check)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ALL,
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(ALL)})",
    )
    parser.add_argument(
        "--vs-book",
        action="store_true",
        help=f"also run the comparisons with the book's package ({', '.join(VS_BOOK)})",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--mirror",
        help="folder with the inputs (tokenizer under gpt2/); default GPTFLOW_MIRROR",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_db_arg(parser)
    parser.set_defaults(func=run)


def selected(only: list[str] | None, vs_book: bool) -> list[str]:
    """The benchmarks to run: ``--only`` (else the suite), plus the book comparisons with
    ``--vs-book``; registry order, no duplicates."""
    chosen = set(only) if only else set(SUITE)
    if vs_book:
        chosen |= set(VS_BOOK)
    return [n for n in ALL if n in chosen]


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
    return "-" if x is None else fmt.yes_no(x) if isinstance(x, bool) else fmt.number(x)


def _range(r: dict[str, Any]) -> str:
    sp = r.get("spread") or {}
    parts = []
    for side in ("baseline", "optimized"):
        s = sp.get(side)
        if s:
            parts.append(f"{_fmt(s['min'])}-{_fmt(s['max'])} (n={s['n']})")
    return " / ".join(parts) or "-"


def format_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The benchmark rows for people (medians; min-max of each side's repeats)."""
    import pandas as pd

    cells = [
        [
            r["name"],
            _fmt(r["baseline"]),
            _fmt(r["optimized"]),
            (_fmt(r["ratio"]) + "x") if r["ratio"] is not None else "-",
            r["unit"],
            _range(r),
            r["target"],
            _fmt(r["met"]),
        ]
        for r in rows
    ]
    head = ["name", "baseline", "optimized", "ratio", "unit", "min-max", "target", "met"]
    return pd.DataFrame(cells, columns=head)


def _mfu_note(rows: list[dict[str, Any]]) -> str | None:
    for r in rows:
        if r["name"] == "train_step":
            d = r["details"]
            peak = d.get("mfu_vs_nominal_peak")
            return (
                f"train_step MFU: {_fmt(peak) if peak is not None else 'n/a'} of the nominal "
                f"peak ({d.get('nominal_peak_formula')}), {_fmt(d.get('mfu_vs_measured_matmul'))} "
                f"of plain-matmul GFLOP/s measured in the same rounds"
            )
    return None


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
    if args.threads:
        torch.set_num_threads(args.threads)
    names = selected(args.only, args.vs_book)
    mirror = args.mirror or os.environ.get("GPTFLOW_MIRROR")
    tok_dir = _tokenizer_dir(mirror)
    hw = bench.hardware()
    print(
        f"gptflow bench{' --quick' if args.quick else ''}: {hw['cpu']}, {hw['cores']} cores "
        f"({hw['cpu_isa']}), torch {hw['torch']} ({hw['threads']} threads), device "
        f"{hw['device']}" + (f" {hw.get('cuda_name')}" if hw.get("cuda_name") else ""),
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
            res = bench.run_benchmark(name, args.quick, tokenizer_dir=tok_dir, mirror=mirror)
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
    print_df(format_table(rows), uncut={"min-max", "target"})
    book = [r for r in rows if r["name"] in VS_BOOK]
    if book:
        print("\nside by side with the book's package (same inputs, same weights):")
        for r in book:
            print(
                f"  {r['name']:<20} {_fmt(r['ratio'])}x  target {r['target']}: "
                f"{'met' if r['met'] else 'not met'}"
            )
    mfu = _mfu_note(rows)
    if mfu:
        print(mfu)
    if args.quick:
        print("note: --quick runs tiny shapes; the targets are meant for the full run")
    for n in notes:
        print(f"note: {n}")

    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "time": now.isoformat(),
        "quick": bool(args.quick),
        "command": "gptflow bench"
        + (" --quick" if args.quick else "")
        + (" --vs-book" if args.vs_book else "")
        + (f" --only {' '.join(args.only)}" if args.only else ""),
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
                        **{k: r[k] for k in ("target", "met", "method", "spread", "workload")},
                        "quick": bool(args.quick),
                    },
                    "time": now,
                }
                for r in rows
            ],
        )
        print(f"wrote {len(rows)} row(s) to {catalog.location} (benchmarks) and {paths[0]}")
    else:
        print(f"no benchmark ran; wrote {paths[0]}")
    return 1 if crashed else 0
