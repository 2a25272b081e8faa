"""``gptflow sql "QUERY"``: query the DuckDB catalog read-only and print the result."""

from __future__ import annotations

import argparse

from flows.commands import add_db_arg, add_format_arg, print_df


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sql",
        help="query the DuckDB catalog (read-only)",
        description=(
            "Run a SQL query on the catalog opened read-only and print the result. "
            "Tables: runs, stages, sources, sms_messages, spam_examples, instructions, "
            "corpus, metrics, checkpoints, samples, baselines, responses, judgments, "
            "benchmarks; views: spam_accuracy, eval_summary, eval_examples."
        ),
    )
    parser.add_argument("query", help='SQL text, e.g. "SELECT * FROM runs"')
    add_format_arg(parser)
    parser.add_argument(
        "--live",
        action="store_true",
        help="read what the writers wrote last (the live file, waiting while a run writes) "
        "instead of the published snapshot (updated after every stage)",
    )
    add_db_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the query and print it in the chosen format."""
    from tasks.catalog.queries import run_readonly_sql

    print_df(run_readonly_sql(args.db or None, args.query, live=args.live), args.format)
    return 0
