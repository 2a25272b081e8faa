"""``gptflow compare [RUN_A] [RUN_B]``: what changed between two runs, and whether it is
more than noise."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from flows.commands import add_db_arg, write_line

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog.compare import Comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    from gpt.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED

    parser = subparsers.add_parser(
        "compare",
        help="compare two runs: config, metrics, spam flips + McNemar, judge deltas + bootstrap",
        description=(
            "Compare run B with run A (differences are B − A). With no run named: the "
            "latest two completed runs (the older is A); with one: that run as B and the "
            "completed run of its profile started before it as A. A run may be given by "
            "a unique prefix of its id. Sections: config differences; every stage's "
            "headline metrics side by side; spam examples whose finetuned prediction "
            "flipped, McNemar's exact test A vs B and finetuned vs the best baseline of "
            "each run; judge score deltas per example, the paired bootstrap interval of "
            "the mean difference and the largest regressions. Cached stages are read "
            "from the run that computed them; a run lacking a section gets a note."
        ),
    )
    parser.add_argument("run_a", nargs="?", default=None, metavar="RUN_A")
    parser.add_argument("run_b", nargs="?", default=None, metavar="RUN_B")
    parser.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="default: table"
    )
    parser.add_argument(
        "--top", type=int, default=5, help="largest judge regressions shown (default: 5)"
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"bootstrap interval coverage (default: {DEFAULT_CONFIDENCE})",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default: {DEFAULT_SEED})"
    )
    add_db_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compare the runs and print the sections in the chosen format."""
    from gpt.errors import ConfigError
    from tasks.catalog import Catalog
    from tasks.catalog.compare import compare_runs, pick_runs

    if args.top < 0:
        raise ConfigError(f"--top must be >= 0, got {args.top}")
    if args.resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {args.resamples}")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must lie between 0 and 1, got {args.confidence}")
    cat = Catalog(args.db, snapshot=True)
    if cat.exists():
        cat.migrate()  # an older catalog gains the views the comparison reads
    run_a, run_b = pick_runs(cat, args.run_a, args.run_b)
    comp = compare_runs(
        cat,
        run_a,
        run_b,
        n_resamples=args.resamples,
        confidence=args.confidence,
        seed=args.seed,
        top=args.top,
    )
    if args.format == "json":
        sys.stdout.write(json.dumps(as_json(comp), indent=2, ensure_ascii=False) + "\n")
    elif args.format == "csv":
        sys.stdout.write(as_csv(comp))
    else:
        for line in as_table(comp).splitlines():
            write_line(line)
    return 0


def _sections(comp: Comparison) -> list[tuple[str, pd.DataFrame]]:
    return [
        ("config", comp.config),
        ("metrics", comp.metrics),
        ("spam_flips", comp.spam_flips),
        ("spam_tests", comp.spam_tests),
        ("judge", comp.judge),
        ("judge_deltas", comp.judge_deltas),
        ("judge_regressions", comp.judge_regressions),
    ]


def _run_meta(info: dict[str, Any]) -> dict[str, Any]:
    from tasks.catalog.present import _jsonable

    return {k: _jsonable(v) for k, v in info.items() if k != "config"}


def as_json(comp: Comparison) -> dict[str, Any]:
    """The comparison as one JSON object (sections as lists of row objects)."""
    from tasks.catalog.present import format_df

    out: dict[str, Any] = {
        "a": _run_meta(comp.run_a),
        "b": _run_meta(comp.run_b),
        "settings": comp.settings,
    }
    for name, df in _sections(comp):
        out[name] = json.loads(format_df(df, "json"))
    out["notes"] = comp.notes
    return out


def as_csv(comp: Comparison) -> str:
    """Each section as a CSV block under a ``# section`` line."""
    from tasks.catalog.present import format_df

    parts = [f"# runs: a={comp.run_a['run_id']} b={comp.run_b['run_id']}\n"]
    for name, df in _sections(comp):
        parts.append(f"# {name}\n" + format_df(df, "csv") + "\n")
    for note in comp.notes:
        parts.append(f"# note: {note}\n")
    return "".join(parts)


def _run_line(tag: str, info: dict[str, Any]) -> str:
    if info.get("profile") is None and info.get("status") is None:
        return f"{tag}  {info['run_id']}  (no pipeline run recorded: judge-only or imported)"
    started = str(info.get("started_at") or "?")[:19]
    git = str(info.get("git_rev") or "?")[:12]
    gates = ""
    if info.get("gates_evaluated"):
        gates = f", gates: {info['gates_failed']} of {info['gates_evaluated']} failed"
    return (
        f"{tag}  {info['run_id']}  profile {info.get('profile')}, {info.get('status')}, "
        f"started {started}, git {git}{gates}"
    )


def _regression_blocks(df: pd.DataFrame) -> list[str]:
    import textwrap

    def plain(text: Any) -> str:  # NULL / NaN → ""; whitespace runs → one space
        return "" if text is None or text != text else " ".join(str(text).split())

    def cut(text: Any, width: int = 300) -> str:
        s = plain(text)
        return textwrap.shorten(s, width, placeholder=" …") if s else "(empty)"

    lines: list[str] = []
    for r in df.to_dict("records"):
        lines.append(
            f"- {r['judge_model']} {r['prompt_version']} example {r['example_id']}: "
            f"{r['score_a']:g} → {r['score_b']:g} ({r['delta']:+g})"
        )
        for label, key in (
            ("instruction", "instruction"),
            ("input", "input"),
            ("reference", "reference"),
            ("response A", "response_a"),
            ("response B", "response_b"),
        ):
            if key == "input" and not plain(r.get(key)):
                continue
            lines.append(f"    {label + ':':13s}{cut(r.get(key))}")
    return lines


def as_table(comp: Comparison) -> str:
    """Human-readable sections."""
    from tasks.catalog.present import format_df

    s = comp.settings
    pct = round(100 * s["confidence"])
    out = [_run_line("A", comp.run_a), _run_line("B", comp.run_b), ""]

    def section(title: str, df: pd.DataFrame, empty: str) -> None:
        out.append(f"== {title}")
        out.append(format_df(df, "table") if not df.empty else empty)
        out.append("")

    section(f"config: {len(comp.config)} difference(s)", comp.config, "(identical)")
    section("metrics (diff = B − A)", comp.metrics, "(no metrics in either run)")
    n_flip = len(comp.spam_flips)
    section(
        f"spam: finetuned predictions that flipped ({n_flip}; change = what B did)",
        comp.spam_flips,
        "(none)",
    )
    section(
        "spam: McNemar's exact test (only_*_right = discordant pairs; p two-sided)",
        comp.spam_tests,
        "(no paired predictions)",
    )
    section(
        f"judge: mean score B − A, paired bootstrap {pct}% interval "
        f"({s['n_resamples']} resamples, seed {s['seed']})",
        comp.judge,
        "(no examples judged in both runs)",
    )
    section("judge: per-example score deltas", comp.judge_deltas, "(none)")
    out.append(f"== judge: largest regressions (top {s['top']} per judge)")
    blocks = _regression_blocks(comp.judge_regressions)
    out += blocks or ["(none)"]
    out.append("")
    if comp.notes:
        out.append("== notes")
        out += [f"- {n}" for n in comp.notes]
    return "\n".join(out).rstrip() + "\n"
