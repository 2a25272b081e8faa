"""Render a ``gptflow bench`` results JSON as the tables of docs/performance.md.

    python -m benchmarks.render benchmarks/results/<stamp>.json [--out FILE]

Prints markdown: a line saying when, how and on what the figures were measured, the
suite table (median figures, each side's min-max over the repeats, ratio, target, met),
the MFU line, the side-by-side table with the book's package, and the notes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.names import VS_BOOK

_UNITS = {"tokens/s": "tok/s", "examples/s": "ex/s"}


def _num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _side(r: dict[str, Any], side: str) -> str:
    unit = _UNITS.get(r["unit"], r["unit"])
    label = r.get(f"{side}_label") or side
    value = f"{_num(r[side])} {unit}"
    s = (r.get("spread") or {}).get(side)
    rng = f" ({_num(s['min'])}–{_num(s['max'])}, n={s['n']})" if s and s.get("n", 0) > 1 else ""
    return f"{label}: {value}{rng}"


def _met(r: dict[str, Any]) -> str:
    if r.get("met") is None:
        return "—"
    return "yes" if r["met"] else "**no**"


def header(payload: dict[str, Any], source: str) -> str:
    """The line saying when, how and on what the figures were measured."""
    hw = payload.get("hardware", {})
    peak = hw.get("cpu_peak_gflops_fp32")
    device = hw.get("device", "cpu")
    gpu = f", GPU {hw['cuda_name']}" if hw.get("cuda_name") else ""
    quick = (
        " **--quick (tiny shapes: a smoke check, not a measurement)**"
        if payload.get("quick")
        else ""
    )
    return (
        f"Measured {str(payload.get('time', '?'))[:16].replace('T', ' ')} UTC with "
        f"`{payload.get('command', 'gptflow bench')}`{quick} on {hw.get('cpu', '?')} "
        f"({hw.get('affinity_cores') or hw.get('cores')} cores, {hw.get('cpu_isa', '?')}, "
        f"nominal fp32 peak {_num(peak)} GFLOP/s), torch {hw.get('torch', '?')}, "
        f"{hw.get('threads', '?')} threads, device {device}{gpu}; 1-minute load average at "
        f"the start {hw.get('loadavg_1m', '?')}. Raw results: `{source}`."
    )


def suite_table(rows: list[dict[str, Any]]) -> str:
    """The table of the suite's rows."""
    out = [
        "| benchmark | workload | baseline | optimized | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r.get('workload', '')} | {_side(r, 'baseline')} | "
            f"{_side(r, 'optimized')} | {_num(r['ratio'])}× | {r.get('target', '')} | "
            f"{_met(r)} |"
        )
    return "\n".join(out)


def book_table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table with the book's package."""
    out = [
        "| comparison | workload | book | gptflow | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name'].removeprefix('vs_book_')} | {r.get('workload', '')} | "
            f"{_side(r, 'baseline')} | {_side(r, 'optimized')} | {_num(r['ratio'])}× | "
            f"{r.get('target', '')} | {_met(r)} |"
        )
    return "\n".join(out)


def mfu_line(rows: list[dict[str, Any]]) -> str | None:
    """Both MFU figures of the training step, each named for what it is."""
    for r in rows:
        if r["name"] == "train_step":
            d = r.get("details", {})
            return (
                f"Training-step model-FLOPs utilisation: {_num(d.get('mfu_vs_nominal_peak'))} "
                f"of the hardware's nominal peak ({d.get('nominal_peak_formula', '?')}), and "
                f"{_num(d.get('mfu_vs_measured_matmul'))} of the plain-matmul throughput "
                f"measured in the same rounds on the step's own matmul shapes, forward and "
                f"backward ({_num(d.get('matmul_gflops_measured'))} GFLOP/s"
                + (
                    f"; forward products alone {_num(d['matmul_gflops_forward_only'])}"
                    if d.get("matmul_gflops_forward_only")
                    else ""
                )
                + f"; achieved {_num(d.get('achieved_gflops'))} GFLOP/s). FLOPs per token: "
                f"6 x matmul weights (LM head once) + 12 x layers x width x context."
            )
    return None


def render(payload: dict[str, Any], source: str = "?") -> str:
    """The whole markdown block for one results payload."""
    rows = payload.get("results", [])
    suite = [r for r in rows if r["name"] not in VS_BOOK]
    book = [r for r in rows if r["name"] in VS_BOOK]
    parts = [header(payload, source), ""]
    if suite:
        parts += [suite_table(suite), ""]
    line = mfu_line(rows)
    if line:
        parts += [line, ""]
    if book:
        parts += [
            "Side by side with the book's own package (`llms-from-scratch`), same "
            "inputs and initial weights, one process, interleaved:",
            "",
            book_table(book),
            "",
        ]
    methods = sorted({r.get("method", "") for r in rows if r.get("method")})
    if methods:
        parts += ["Method of each row:", ""]
        parts += [f"- {r['name']}: {r['method']}" for r in rows if r.get("method")]
        parts.append("")
    if payload.get("hardware", {}).get("device") != "cuda":
        parts += ["No GPU figures: this run had no GPU.", ""]
    for n in payload.get("notes", []):
        parts.append(f"- note: {n}")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: render FILE to stdout or ``--out``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__)
    p.add_argument("results", type=Path, help="a JSON file written by `gptflow bench`")
    p.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = p.parse_args(argv)
    try:
        payload = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        print(f"{args.results} is not a `gptflow bench` results file", file=sys.stderr)
        return 1
    text = render(payload, str(args.results))
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
