"""``gptflow evals``: the judge's scores — summary, then per-example rows."""

from __future__ import annotations

import argparse
import sys

from flows.commands import add_db_arg, add_format_arg, sections_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evals",
        help="show judge scores: eval_summary, then per-example rows",
        description=(
            "Print the eval_summary view (per run, judge model and prompt version: n, "
            "n scored, n unparsed, n failed, mean, median, min, max), then the "
            "per-example rows of eval_examples (instruction, input, reference output, "
            "response, repeat, score, raw reply); with --worst N only the N lowest-scored "
            "examples (unscored first)."
        ),
    )
    parser.add_argument(
        "--run", help="only this run: its id or a unique prefix (default: every run)"
    )
    parser.add_argument("--worst", type=int, metavar="N", help="only the N worst examples")
    add_format_arg(parser)
    add_db_arg(parser)
    parser.set_defaults(func=run)


_EXAMPLE_COLS = (
    "run_id, example_id, judge_model, prompt_version, repeat, score, raw_reply, "
    "instruction, input, output, response"
)


def run(args: argparse.Namespace) -> int:
    """Print the summary and the examples in the chosen format."""
    from gpt.errors import ConfigError
    from tasks.catalog import Catalog
    from tasks.catalog.lookup import resolve_run
    from tasks.catalog.present import format_df
    from tasks.stages.judge import summarize

    if args.worst is not None and args.worst < 1:
        raise ConfigError(f"--worst must be >= 1, got {args.worst}")
    catalog = Catalog(args.db, snapshot=True)
    if args.run is not None:
        args.run = resolve_run(catalog, args.run)  # a run that does not exist: an error
    summary = summarize(catalog, args.run)

    where, params = "", []
    if args.run is not None:
        where, params = "WHERE run_id = ?", [args.run]
    if args.worst is not None:
        # Worst first: failed/unparsed (NULL) scores, then the lowest scores.
        order = "ORDER BY score ASC NULLS FIRST, run_id, example_id LIMIT ?"
        params = [*params, args.worst]
    else:
        order = "ORDER BY run_id, judge_model, prompt_version, example_id, repeat"
    examples = catalog.query_df(
        f"SELECT {_EXAMPLE_COLS} FROM eval_examples {where} {order}", params
    )

    if args.format != "table":
        sys.stdout.write(sections_text(args.format, {"summary": summary, "examples": examples}))
    else:
        sys.stdout.write("eval_summary\n" + format_df(summary, "table") + "\n\n")
        title = f"worst {args.worst} examples" if args.worst is not None else "examples"
        sys.stdout.write(title + "\n" + format_df(examples, "table") + "\n")
    if summary.empty:
        from tasks.catalog.status import why_no_scores

        print(f"no judge scores: {why_no_scores(catalog, args.run)}", file=sys.stderr)
    return 0
