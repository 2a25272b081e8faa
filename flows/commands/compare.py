"""``gptflow compare [RUN_A] [RUN_B]``: what changed between two runs, and whether it is
more than noise."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from flows.commands import add_db_arg, add_format_arg, sections_text, write_line

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog.compare import Comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    from gpt.eval.gates import DEFAULT_MIN_EXAMPLES
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
            "the mean difference with a verdict (given as many paired examples as the judge "
            "gate needs) and the largest regressions. Cached stages are read "
            "from the run that computed them; a run lacking a section gets a note."
        ),
    )
    parser.add_argument("run_a", nargs="?", metavar="RUN_A")
    parser.add_argument("run_b", nargs="?", metavar="RUN_B")
    add_format_arg(parser)
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
    parser.add_argument(
        "--min-examples",
        type=int,
        metavar="N",
        help="paired examples a judge verdict needs; with fewer it says 'not enough data' "
        "(default: run B's gates.judge_min_examples, else "
        f"{DEFAULT_MIN_EXAMPLES} as the judge gate)",
    )
    add_db_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compare the runs and print the sections in the chosen format (every table of
    :class:`~tasks.catalog.compare.Comparison`, in its order)."""
    import dataclasses

    import pandas as pd

    from gpt.errors import ConfigError
    from tasks.catalog import Catalog
    from tasks.catalog.compare import compare_runs, pick_runs
    from tasks.jsonable import plain

    if args.top < 0:
        raise ConfigError(f"--top must be >= 0, got {args.top}")
    if args.resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {args.resamples}")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must lie between 0 and 1, got {args.confidence}")
    if args.min_examples is not None and args.min_examples < 1:
        raise ConfigError(f"--min-examples must be >= 1, got {args.min_examples}")
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
        min_examples=args.min_examples,
    )
    if args.format == "table":
        write_line(as_table(comp).removesuffix("\n"))
        return 0
    tables = {f.name: getattr(comp, f.name) for f in dataclasses.fields(comp)}
    sections = {name: t for name, t in tables.items() if isinstance(t, pd.DataFrame)}
    if args.format == "json":
        meta = {
            **{k: {f: plain(v) for f, v in i.items() if f != "config"}
               for k, i in (("a", comp.run_a), ("b", comp.run_b))},
            "settings": comp.settings,
        }  # fmt: skip
    else:
        meta = {"runs": f"a={comp.run_a['run_id']} b={comp.run_b['run_id']}"}
    sys.stdout.write(sections_text(args.format, sections, meta=meta, notes=comp.notes))
    return 0


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
    """Each regression: the scores, then its texts on one line each (an empty input is
    left out)."""
    from flows.report import fmt

    labels = {"instruction": "instruction", "input": "input", "reference": "reference",
              "response_a": "response A", "response_b": "response B"}  # fmt: skip
    lines: list[str] = []
    for r in df.to_dict("records"):
        lines.append(
            f"- {r['judge_model']} {r['prompt_version']} example {r['example_id']}: "
            f"{r['score_a']:g} → {r['score_b']:g} ({r['delta']:+g})"
        )
        for key, label in labels.items():
            empty = fmt.is_missing(r.get(key))
            if not (key == "input" and empty):
                text = "(empty)" if empty else fmt.shorten(r[key], 300)
                lines.append(f"    {label + ':':13s}{text}")
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
        f"({s['n_resamples']} resamples, seed {s['seed']}); a verdict needs "
        f"{s['min_examples']} paired examples",
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
