"""``gptflow judge --responses FILE.json``: score a file of responses with the Ollama
judge, as a run of its own (or as the responses of an existing run)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flows.commands import add_db_arg, print_df

if TYPE_CHECKING:
    from tasks.catalog import Catalog


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "judge",
        help="score a JSON file of responses with the local Ollama judge",
        description=(
            "Store a JSON list of objects with instruction, input, output and a response "
            "field as the responses of a run, score them with one or more Ollama models "
            "(default llama3) on one or more Ollama servers, and print the run's "
            "eval_summary (and judge_agreement with several models). A rerun only sends "
            "the judgments not yet made under the same judge key (model and its digest, "
            "prompt, sampling options, reader)."
        ),
    )
    parser.add_argument(
        "--responses", required=True, type=Path, help="JSON list of response records"
    )
    parser.add_argument(
        "--run",
        help="the run to store the responses under: an existing run's id or a unique "
        "prefix of it, or a new name (default: judge-<file stem>)",
    )
    parser.add_argument(
        "--model",
        action="append",
        help="Ollama judge model; repeat for several judges (default: llama3)",
    )
    parser.add_argument(
        "--host",
        action="append",
        help="Ollama URL; repeat to spread the requests over several servers "
        "(default: OLLAMA_HOST or http://localhost:11434)",
    )
    parser.add_argument("--repeats", type=int, help="scorings per example and model (default: 1)")
    parser.add_argument(
        "--response-key",
        default="model_response",
        help="field holding the response to score (default: model_response)",
    )
    parser.add_argument("--concurrency", type=int, help="requests in flight per host (default: 4)")
    parser.add_argument(
        "--auto-pull", action="store_true", help="pull the judge model if it is missing"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_db_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import the responses, judge them as a recorded run, print the summary; 1 when
    requests failed."""
    from flows.run_start import recorded_run
    from gpt.eval.judge.settings import JudgeConfig
    from gpt.paths import artifacts_root, datasets_dir
    from tasks.catalog import Catalog
    from tasks.stages.contract import RunContext
    from tasks.stages.judge import import_responses, responses_input, summarize
    from tasks.stages.runner import run_stage

    given = {
        "models": args.model,
        "hosts": args.host,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
    }
    cfg = JudgeConfig(
        required=True,
        auto_pull=bool(args.auto_pull),
        **{k: v for k, v in given.items() if v is not None},
    )
    catalog = Catalog(args.db)
    run_id = _run_for(catalog, args.run, f"judge-{args.responses.stem}")
    n = import_responses(catalog, run_id, args.responses, response_key=args.response_key)
    print(f"stored {n} responses from {args.responses} under run {run_id!r}")
    ctx = RunContext(
        run_id=run_id,
        catalog_settings=catalog.settings.pinned().without_secrets(),
        artifacts=artifacts_root(),
        datasets=str(datasets_dir()),
        progress=not args.no_progress,
    )
    # a judge-only run is recorded, its config the judge section; a pipeline run (its
    # responses imported again) keeps its own record
    profile = catalog.query_df("SELECT profile FROM runs WHERE run_id = ?", [run_id])
    record = profile.empty or profile["profile"].iloc[0] == "judge"
    with (
        recorded_run(ctx, profile="judge", config={"judge": cfg.to_dict()})
        if record
        else contextlib.nullcontext()
    ):
        result = run_stage(ctx, "judge", cfg, extract_responses=responses_input(catalog, run_id))
    out = result.out
    how = (
        "cached: the same responses were judged with these settings before"
        if result.cache_hit
        else f"sent {out.n_sent}, skipped {out.n_skipped} already judged, reused "
        f"{out.n_reused} stored replies"
    )
    print(
        f"judge {', '.join(out.judge_models)} (prompt {out.prompt_version}, "
        f"{out.repeats} repeat(s)): {how}; scored {out.n_scored}, unparsed {out.n_unparsed}, "
        f"failed {out.n_failed}"
    )
    for down in out.hosts_down:
        print(f"judge host down: {down}", file=sys.stderr)
    summary = summarize(catalog, run_id)
    print_df(summary)
    agreement = catalog.query_df(
        "SELECT * FROM judge_agreement WHERE run_id = ? ORDER BY judge_a, judge_b", [run_id]
    )
    if not agreement.empty:
        print("judge_agreement")
        print_df(agreement)
    failed = int(summary["n_failed"].sum()) if "n_failed" in summary else 0
    if failed:
        print(
            f"{failed} request(s) failed after retries (see `gptflow evals --run "
            f"{run_id}`); run the same command again to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_for(catalog: Catalog, ref: str | None, default: str) -> str:
    """The run to store the responses under: ``ref`` as an existing run's id or unique
    prefix (:func:`~tasks.catalog.lookup.resolve_run`), else as a new run's name; without
    ``ref``, ``default`` (taken as it is)."""
    from tasks.catalog.lookup import resolve_run, run_ids_like

    if ref is None:
        return default
    if not catalog.exists() or not run_ids_like(catalog, ref):
        return ref  # a new run
    return resolve_run(catalog, ref)
