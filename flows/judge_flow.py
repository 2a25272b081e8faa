"""The ``gptflow-judge`` flow: score responses already in the catalog with the Ollama
judge, without rerunning the pipeline (the ``judge-rescore`` deployment runs it). It runs
the pipeline's own judge stage (:mod:`tasks.stages.judge`), on the responses of
``responses_run`` (default: the latest run holding responses).

- The judge settings come from the profile's ``judge`` section + ``--set`` overrides;
  the ``required`` parameter wins over the profile.
- Resumes: only examples without a judgment under the same judge key are sent; a result
  already computed for the same responses and settings is a cache hit.
- Records a run with a ``judge`` stage row under the flow run id and a table artifact of
  the ``eval_summary`` row.
- With ``required`` false an unreachable Ollama (or a missing model) ends the stage
  ``skipped`` (the task's state is named Skipped) with the fix recorded; with
  ``required`` true the flow fails with that message.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import StrictBool, StrictStr

from flows.config import DEFAULT_PROFILE, build_config, config_to_dict
from flows.pipeline import crashed_state, git_revision, make_context, record_failed_start
from flows.run_logs import route_library_logs
from gpt.errors import DataError, GPTFlowError
from tasks.cache import StageOutput
from tasks.catalog import Catalog
from tasks.flow_tasks import skipped_info, stage_task
from tasks.stages.base import plain
from tasks.stages.judge import responses_input


def latest_responses_run(catalog: Catalog) -> str:
    """The run whose responses were stored last (by the run's start time, then by id)."""
    df = catalog.query_df(
        "SELECT r.run_id FROM (SELECT DISTINCT run_id FROM responses) r "
        "LEFT JOIN runs ON runs.run_id = r.run_id "
        "ORDER BY runs.started_at DESC NULLS LAST, r.run_id DESC LIMIT 1"
    )
    if df.empty:
        raise DataError(
            f"the catalog {catalog.location} holds no responses to judge — run the pipeline "
            "(`gptflow run`) or import some with `gptflow judge --responses FILE.json` first"
        )
    return str(df["run_id"].iloc[0])


@flow(name="gptflow-judge", log_prints=True, validate_parameters=True)
def gptflow_judge(
    responses_run: StrictStr | None = None,
    profile: StrictStr = DEFAULT_PROFILE,
    overrides: list[StrictStr] | None = None,
    required: StrictBool = True,
    force: StrictBool = False,
) -> dict[str, Any]:
    """Score stored responses with the Ollama judge. ``responses_run``: the run whose
    responses to judge (default: the latest one holding responses); ``profile`` +
    ``overrides`` (``judge.field=value``) set the judge; ``required`` false turns an
    unavailable judge into a skipped stage instead of a failed flow; ``force`` scores
    every example again."""
    log = get_run_logger()
    route_library_logs()  # the judge's own INFO lines reach this run's logs
    run_id = str(flow_run.get_id() or os.urandom(8).hex())
    try:
        cfg = build_config(profile, [*(overrides or []), f"judge.required={json.dumps(required)}"])
        ctx = make_context(cfg, run_id, force=["judge"] if force else [], progress=False)
    except GPTFlowError as exc:  # bad settings in a started flow run: a failed run too
        record_failed_start(run_id, profile, exc)
        raise
    cat = ctx.catalog
    rec = ctx.recorder
    try:
        with rec.running(
            run_id,
            flow_run_id=run_id,
            profile=cfg.profile,
            config=config_to_dict(cfg),
            git_rev=git_revision(),
        ):
            target = responses_run or latest_responses_run(cat)
            log.info(
                "run %s: judging the responses of run %s with %s",
                run_id,
                target,
                ", ".join(cfg.judge.models),
            )
            judged = stage_task("judge")(
                ctx, cfg.judge, extract_responses=responses_input(cat, target)
            )
    except BaseException as exc:
        return crashed_state(exc)  # the worker died: the flow run is Crashed, saying so
    skipped = skipped_info(judged)
    if skipped is not None or not isinstance(judged, StageOutput):  # the reason and the fix
        return {**(skipped or {}), "run_id": run_id, "responses_run_id": target}
    out = judged.data
    rows = out.get("summary") or []  # plain JSON values (a stage result)
    if rows:
        create_table_artifact(
            key="eval-summary",
            table=rows,
            description=(
                f"Judge scores of run `{target}` by "
                f"{', '.join(f'`{m}`' for m in out['judge_models'])} "
                f"(prompt {out['prompt_version']}, {out['repeats']} repeat(s))"
                + (" — cached result" if judged.cache_hit else f": {out['n_sent']} sent")
            ),
        )
    agreement = cat.query_df("SELECT * FROM judge_agreement WHERE run_id = ?", [run_id])
    if not agreement.empty:
        create_table_artifact(
            key="judge-agreement",
            table=plain(agreement.to_dict("records")),
            description=f"Agreement between the judge models on run `{target}`.",
        )
    return {
        **out,
        "run_id": run_id,
        "status": "cached" if judged.cache_hit else "completed",
        "cache_hit": judged.cache_hit,
    }


__all__ = ["gptflow_judge", "latest_responses_run"]
