"""``gptflow report [RUN] [--html FILE] [--markdown FILE]``: a run's report (the same one
the pipeline attaches to its Prefect flow run), as one self-contained HTML file, as
Markdown, or as text on the terminal."""

from __future__ import annotations

import argparse
import sys

from flows.commands import add_db_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a run's report: --html FILE (self-contained, plots inside) or --markdown FILE",
        description=(
            "Build the report of RUN (default: the latest run) from the catalog: stages, "
            "data, training curves, spam classifier vs baselines with confusion matrices, "
            "judge scores, gates, checkpoints, config. --html writes one HTML file with "
            "its plots inside (open it anywhere, no server needed); --markdown writes the "
            "Markdown the Prefect artifact holds. Without either, prints the text with "
            "plots left out."
        ),
    )
    p.add_argument("run", nargs="?", help="run id or a unique prefix (default: the latest run)")
    p.add_argument("--html", metavar="FILE", help="write the report as one HTML file")
    p.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    add_db_arg(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flows.commands import run_or_latest
    from flows.report.blocks import to_html, to_markdown
    from flows.report.build import build_report
    from gpt.errors import CatalogError
    from gpt.fileio import atomic_open
    from tasks.catalog import Catalog

    cat = Catalog(args.db, snapshot=True)
    with cat.held(read_only=True):  # the report's queries on one reader: one snapshot
        run_id = run_or_latest(cat, args.run)
        report = build_report(cat, run_id)
    written = []
    for target, render in ((args.html, to_html), (args.markdown, to_markdown)):
        if target:
            path = Path(target)
            try:
                with atomic_open(path, "w", encoding="utf-8") as fh:
                    fh.write(render(report))
            except OSError as exc:
                raise CatalogError(f"cannot write the report to {path}: {exc.strerror}") from None
            written.append(str(path))
    if written:
        n = len(report.images())
        print(f"report of run {run_id} ({n} plots) written to {', '.join(written)}")
        return 0
    md = to_markdown(report, wrap=False, images=False)  # a terminal wraps lines itself
    sys.stdout.write(md)
    return 0
