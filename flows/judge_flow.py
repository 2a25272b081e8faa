"""The ``gptflow-judge`` flow (deployment ``judge-rescore``): score responses already in
the catalog with the pipeline's own judge stage, as a recorded run of its own, without
rerunning the pipeline.

Judge settings come from the profile's ``judge`` section and ``--set``; the ``required``
parameter wins. Only examples not yet judged under the same judge key are sent. With
``required`` false an unreachable Ollama ends the stage ``skipped`` with the fix; with
``required`` true the flow fails with that message.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State
from pydantic import StrictBool, StrictStr

from flows.config import build_config
from flows.profiles import DEFAULT_PROFILE
from flows.report.publish import publish_table
from flows.run_start import FlowRun
from gpt.errors import DataError
from tasks.catalog import Catalog
from tasks.catalog.lookup import resolve_run
from tasks.stages.contract import StageOutput
from tasks.stages.judge import responses_input
from tasks.stages.prefect_tasks import skipped_info, stage_task


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
) -> dict[str, Any] | State:
    """Score stored responses with the Ollama judge. ``responses_run``: the run whose
    responses to judge, by its id or a unique prefix (default: the latest one holding
    responses); ``profile`` + ``overrides`` (``judge.field=value``) set the judge;
    ``required`` false turns an unavailable judge into a skipped stage instead of a
    failed flow; ``force`` scores every example again."""
    run = FlowRun.start(
        profile,
        lambda: build_config(
            profile, [*(overrides or []), f"judge.required={json.dumps(required)}"]
        ),
        force=["judge"] if force else [],
        progress=False,
    )
    cat = run.ctx.catalog

    def judge() -> tuple[str, Any]:
        target = resolve_run(cat, responses_run) if responses_run else latest_responses_run(cat)
        get_run_logger().info(
            "run %s: judging the responses of run %s with %s",
            run.run_id,
            target,
            ", ".join(run.cfg.judge.models),
        )
        task = stage_task("judge")
        return target, task(run.ctx, run.cfg.judge, extract_responses=responses_input(cat, target))

    done = run.record(judge)
    if isinstance(done, State):
        return done  # the worker died: the flow run is Crashed, saying so
    target, judged = done
    skipped = skipped_info(judged)
    if skipped is not None or not isinstance(judged, StageOutput):  # the reason and the fix
        return {**(skipped or {}), "run_id": run.run_id, "responses_run_id": target}
    out = judged.data
    models = ", ".join(f"`{m}`" for m in out["judge_models"])
    how = " — cached result" if judged.cache_hit else f": {out['n_sent']} sent"
    publish_table(
        "eval-summary",
        out.get("summary") or [],
        f"Judge scores of run `{target}` by {models} (prompt {out['prompt_version']}, "
        f"{out['repeats']} repeat(s)){how}",
    )
    publish_table(
        "judge-agreement",
        cat.query_df("SELECT * FROM judge_agreement WHERE run_id = ?", [run.run_id]),
        f"Agreement between the judge models on run `{target}`.",
    )
    return {
        **out,
        "run_id": run.run_id,
        "status": "cached" if judged.cache_hit else "completed",
        "cache_hit": judged.cache_hit,
    }
