"""judge: score responses with the Ollama judge (:func:`tasks.judging.judge_run`).

The pipeline (responses of its extract_responses stage) and the ``gptflow-judge`` flow
and ``gptflow judge`` command (responses already in the catalog) run this same stage.
Its key covers the responses' content and the settings that shape scores (model,
seed, temperature, context, prompt and parser code), not where the server is or how
many requests fly at once. Judging resumes: only examples without a judgment are sent.
A result is committed only when every request got an answer; otherwise the stage says
how many failed and a rerun sends only those. With ``required`` false an unavailable
judge ends the stage as ``skipped`` with the fix recorded.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gpt.errors import DataError, JudgeError
from gpt.eval.judge import PROMPT_VERSION, JudgeConfig
from gpt.eval.judge import judge_fix as availability_fix
from tasks.cache import StageOutput, stable_json
from tasks.catalog import Catalog
from tasks.judging import judge_run
from tasks.stages.base import StageIncomplete, StageOut, StageRun, StageSkipped, stage

STAGE = "judge"


def judge_fix(cfg: JudgeConfig) -> str:
    """The exact commands that make the judges available, then the rerun."""
    return (
        f"{availability_fix(cfg)}, then `gptflow rerun judge` (or run the "
        "`prefect deployment run 'gptflow-judge/judge-rescore'` deployment)"
    )


class JudgeOut(StageOut):
    """What the judge did for one run's responses."""

    responses_run_id: str
    judge_models: list[str]
    prompt_version: str
    repeats: int
    n_responses: int
    n_skipped: int
    """Already judged before this stage ran (not sent again)."""
    n_sent: int
    n_scored: int
    n_unparsed: int
    n_failed: int
    summary: list[dict[str, Any]]
    """The run's ``eval_summary`` rows, one per judge model (this prompt version)."""
    agreement: list[dict[str, Any]]
    """``judge_agreement`` rows between the judge models (two or more models)."""
    hosts_down: list[str]
    """``url: why`` of each server found down or taken out of rotation."""


_RESPONSE_COLS = "example_id, instruction, input, output, response"


def responses_input(catalog: Catalog, run_id: str) -> StageOutput:
    """The responses a run holds in the catalog, as the judge stage's input (its digest
    hashes the run and their text, so re-imported, changed responses get a new key)."""
    df = catalog.query_df(
        f"SELECT {_RESPONSE_COLS} FROM responses WHERE run_id = ? ORDER BY example_id", [run_id]
    )
    if df.empty:
        raise DataError(
            f"run {run_id!r} has no responses in the catalog {catalog.location} — run the "
            "response-extraction stage or `gptflow judge --responses FILE.json` first"
        )
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    # judgments belong to a run's responses: the run is part of what is judged
    digest = hashlib.sha256(stable_json({"run_id": run_id, "rows": rows}).encode()).hexdigest()
    return StageOutput(
        stage="extract_responses", key="catalog", root="", run_id=run_id, digest=digest
    )


@stage(STAGE)
def judge(run: StageRun, args: JudgeConfig, extract_responses: StageOutput) -> JudgeOut:
    cat = run.ctx.catalog
    responses_run = extract_responses.run_id
    if STAGE in run.ctx.force:  # score everything again
        for model in args.models:
            cat.replace_rows(
                "judgments",
                [],
                where={
                    "run_id": responses_run,
                    "judge_model": model,
                    "prompt_version": PROMPT_VERSION,
                },
            )
    try:
        s = judge_run(cat, responses_run, args, progress=run.progress)
    except JudgeError as exc:
        msg = f"{exc} — fix: {judge_fix(args)}"
        if args.required:
            raise JudgeError(msg) from None
        run.log().warning("judge skipped: %s", msg)
        raise StageSkipped(msg) from None
    models = ", ".join("?" for _ in args.models)
    judgments = cat.query_df(
        f"SELECT * FROM judgments WHERE run_id = ? AND prompt_version = ? "
        f"AND judge_model IN ({models}) ORDER BY judge_model, example_id, repeat",
        [responses_run, PROMPT_VERSION, *args.models],
    )
    responses = cat.query_df(
        "SELECT * FROM responses WHERE run_id = ? ORDER BY example_id", [responses_run]
    )
    for table, df in (("judgments", judgments), ("responses", responses)):
        run.rows.add(table, df.astype(object).where(df.notna(), None).to_dict("records"))
    out = JudgeOut(
        responses_run_id=responses_run,
        judge_models=s.judge_models,
        prompt_version=s.prompt_version,
        repeats=s.repeats,
        n_responses=s.n_responses,
        n_skipped=s.n_skipped,
        n_sent=s.n_sent,
        n_scored=s.n_scored,
        n_unparsed=s.n_unparsed,
        n_failed=s.n_failed,
        summary=s.summary,
        agreement=s.agreement,
        hosts_down=s.hosts_down,
    )
    run.log().info(
        "judged run %s with %s: %d sent (%d scored, %d unparsed, %d failed), %d already judged",
        responses_run, ", ".join(s.judge_models), s.n_sent, s.n_scored, s.n_unparsed, s.n_failed,
        s.n_skipped,
    )  # fmt: skip
    failed = int(judgments["error"].notna().sum() if "error" in judgments.columns else s.n_failed)
    if failed:
        raise StageIncomplete(
            out,
            f"{failed} of {len(judgments)} judgments failed after retries (errors are in "
            "`judgments.error`); `gptflow rerun judge` sends only those",
        )
    return out
