"""``gptflow runs [RUN]``: the pipeline runs and their stages, or one run's stages one
per line, never hiding a stage that did not complete or why."""

from __future__ import annotations

import argparse
import json

from flows.commands import add_db_arg, add_format_arg, print_df


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list pipeline runs and their stages (or one run's stages, one per line)",
    )
    p.add_argument("run", nargs="?", help="show this run's stages, one line each")
    p.add_argument("--limit", type=int, default=10)
    add_format_arg(p)
    add_db_arg(p)
    p.set_defaults(func=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    """Runs with a stage summary that names every stage not completed/cached, and the
    reasons (whole) under the table; with RUN, that run's stages one per line."""
    from flows.report import fmt
    from gpt.errors import ConfigError
    from tasks.catalog import Catalog
    from tasks.catalog.lookup import resolve_run
    from tasks.catalog.present import format_df
    from tasks.catalog.status import stage_rows, stages_summary
    from tasks.records.run_state import settle_runs
    from tasks.stages import STAGES

    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    cat = Catalog(args.db, snapshot=True)
    if args.run:
        run_id = resolve_run(cat, args.run)  # the id or a unique prefix
        runs = cat.query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if runs.empty:
            raise ConfigError(
                f"run {run_id} has no `runs` row in the catalog {cat.location} (it only "
                "holds judge scores: see `gptflow evals --run`)"
            )
    else:
        runs = cat.query_df("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", [args.limit])
    runs = settle_runs(runs)  # a "running" run whose process is gone shows as crashed
    stages = stage_rows(cat, [str(r) for r in runs["run_id"]], STAGES)
    if args.format == "json":
        rows = json.loads(format_df(runs.drop(columns="config"), "json"))
        for row in rows:
            mine = stages[stages["run_id"] == row["run_id"]]
            row["stages"] = json.loads(
                format_df(mine[["stage", "status", "cache_hit", "message"]], "json")
            )
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if args.run:
        view = stages.assign(
            cached=stages["cache_hit"].map(fmt.yes_no),
            time=stages["seconds"].map(fmt.duration),
            message=stages["message"].map(lambda m: m if isinstance(m, str) else ""),
        )[["stage", "status", "cached", "time", "message"]]
        print_df(view, args.format, uncut={"message"})
        if args.format == "table":
            r = runs.iloc[0]
            reason = f": {r['message']}" if isinstance(r["message"], str) else ""
            print(f"run {r['run_id']} {r['status']}{reason}")
        return 0
    view = runs[["run_id", "profile", "status"]].copy()
    view["started"] = runs["started_at"].map(fmt.timestamp)
    view["took"] = [
        fmt.duration((e - s).total_seconds())
        if not (fmt.is_missing(s) or fmt.is_missing(e))
        else ""
        for s, e in zip(runs["started_at"], runs["ended_at"], strict=True)
    ]
    view["stages"] = [stages_summary(stages[stages["run_id"] == r]) for r in runs["run_id"]]
    print_df(view, args.format, uncut={"run_id", "stages"})
    if args.format == "table":
        for r in runs[runs["message"].notna()].to_dict("records"):  # why it failed/crashed
            print(f"{r['run_id']}: run {r['status']}: {r['message']}")
        notes = stages[~stages["status"].isin(["completed", "cached"]) & stages["message"].notna()]
        for r in notes.to_dict("records"):
            print(f"{r['run_id']}: {r['stage']} {r['status']}: {r['message']}")
    return 0
