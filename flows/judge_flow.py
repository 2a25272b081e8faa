"""The ``gptflow-judge`` flow: re-score responses already in the catalog with the Ollama
judge, without rerunning the pipeline (the ``judge-rescore`` deployment runs it).

- Picks the latest run holding ``responses`` unless ``responses_run`` names one.
- Builds the judge settings from the profile's ``judge`` section + ``--set`` overrides;
  the ``required`` parameter wins over the profile.
- Resumes: only examples without a judgment by this model + prompt version are sent.
- Records a ``judge`` stage row under the flow run id (the catalog run id) and a table
  artifact of the ``eval_summary`` row.
- With ``required`` false an unreachable Ollama (or a missing model) ends the task
  Completed, named ``Skipped``, with the fix recorded; with ``required`` true the flow
  fails with that message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.config import DEFAULT_PROFILE, build_config, config_to_dict
from flows.run_logs import route_library_logs
from gpt.errors import DataError, GPTFlowError, JudgeError
from gpt.eval.judge import JudgeConfig
from gpt.paths import default_db_path
from tasks.catalog import Catalog, utcnow

STAGE = "judge"


def judge_fix(model: str) -> str:
    """The exact commands that make the judge available, then the rerun."""
    return (
        f"start Ollama with `ollama serve`, pull the judge with `ollama pull {model}`, then "
        "rerun `prefect deployment run 'gptflow-judge/judge-rescore'` (or `gptflow rerun judge`)"
    )


def latest_responses_run(catalog: Catalog) -> str:
    """The run whose responses were stored last (by the run's start time, then by id)."""
    df = catalog.query_df(
        "SELECT r.run_id FROM (SELECT DISTINCT run_id FROM responses) r "
        "LEFT JOIN runs ON runs.run_id = r.run_id "
        "ORDER BY runs.started_at DESC NULLS LAST, r.run_id DESC LIMIT 1"
    )
    if df.empty:
        raise DataError(
            f"the catalog {catalog.path} holds no responses to judge — run the pipeline "
            "(`gptflow run`) or import some with `gptflow judge --responses FILE.json` first"
        )
    return str(df["run_id"].iloc[0])


def _jsonable(value: Any) -> Any:
    """Plain JSON values for an artifact cell (numpy scalars, NaN → None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _no_retry_on_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a gptflow error (judge unavailable, bad config, no
    responses) fails the same way again."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, GPTFlowError)


@task(
    name="judge-rescore",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_no_retry_on_user_error,
    cache_policy=NO_CACHE,
)
def rescore_task(
    run_id: str, responses_run: str, judge: dict[str, Any], db_path: str
) -> dict[str, Any] | Any:
    """Score ``responses_run``'s unscored responses; record the ``judge`` stage of
    ``run_id``. Returns the :class:`~tasks.judging.JudgeSummary` as a dict, or a
    Completed state named Skipped when the judge is unavailable and not required."""
    from tasks.judging import judge_run

    log = get_run_logger()
    cat = Catalog(db_path)
    cfg = JudgeConfig.model_validate(judge)
    started = utcnow()
    cat.record_stage(run_id, STAGE, status="running", started_at=started)
    try:
        summary = judge_run(cat, responses_run, cfg, progress=False)
    except JudgeError as exc:
        msg = f"{exc} — fix: {judge_fix(cfg.model)}"
        outputs = {"responses_run_id": responses_run, "judge_model": cfg.model}
        if cfg.required:
            cat.record_stage(
                run_id, STAGE, status="failed", started_at=started, message=msg, outputs=outputs
            )
            raise type(exc)(msg) from None
        log.warning("judge skipped: %s", msg)
        cat.record_stage(
            run_id, STAGE, status="skipped", started_at=started, message=msg, outputs=outputs
        )
        return Completed(
            name="Skipped",
            message=msg,
            data={"status": "skipped", "message": msg, "responses_run_id": responses_run},
        )
    except Exception as exc:
        cat.record_stage(run_id, STAGE, status="failed", started_at=started, message=str(exc))
        raise
    info = dataclasses.asdict(summary)
    info["summary"] = {k: _jsonable(v) for k, v in info["summary"].items()}
    sent = info["n_sent"]
    cat.record_stage(
        run_id,
        STAGE,
        status="cached" if sent == 0 else "completed",
        started_at=started,
        cache_hit=sent == 0,
        outputs={"responses_run_id": responses_run, **info},
    )
    log.info(
        "judged run %s with %s: %d sent (%d scored, %d unparsed, %d failed), %d already judged",
        responses_run,
        cfg.model,
        sent,
        info["n_scored"],
        info["n_unparsed"],
        info["n_failed"],
        info["n_skipped"],
    )
    return {"status": "completed", "responses_run_id": responses_run, **info}


def _git_revision() -> str | None:
    try:
        from flows.pipeline import git_revision

        return git_revision()
    except Exception:  # lineage is best effort; never fail a rescore over it
        return None


@flow(name="gptflow-judge", log_prints=True, validate_parameters=True)
def gptflow_judge(
    responses_run: str | None = None,
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    required: bool = True,
) -> dict[str, Any]:
    """Re-score stored responses with the Ollama judge. ``responses_run``: the run whose
    responses to judge (default: the latest one holding responses); ``profile`` +
    ``overrides`` (``judge.field=value``) set the judge; ``required`` false turns an
    unavailable judge into a Skipped stage instead of a failed flow."""
    log = get_run_logger()
    route_library_logs()  # [h12] the judge's own INFO lines reach this run's logs
    cfg = build_config(profile, [*(overrides or []), f"judge.required={json.dumps(required)}"])
    run_id = str(flow_run.get_id() or os.urandom(8).hex())
    cat = Catalog(default_db_path())
    cat.migrate()
    target = responses_run or latest_responses_run(cat)
    cat.start_run(
        run_id,
        flow_run_id=run_id,
        profile=cfg.profile,
        config=config_to_dict(cfg),
        git_rev=_git_revision(),
    )
    log.info("run %s: judging the responses of run %s with %s", run_id, target, cfg.judge.model)
    try:
        state = rescore_task(
            run_id, target, cfg.judge.model_dump(mode="json"), str(cat.path), return_state=True
        )
        result = state.result()  # raises the task's error when it failed
    except BaseException:
        cat.end_run(run_id, "failed")
        raise
    if state.name == "Skipped":
        cat.end_run(run_id, "completed")
        return {**result, "run_id": run_id}
    cat.end_run(run_id, "completed")
    row = result.get("summary") or {}
    if row:
        create_table_artifact(
            key="eval-summary",
            table=[row],
            description=(
                f"Judge scores of run `{target}` by `{result['judge_model']}` "
                f"(prompt {result['prompt_version']}): {result['n_sent']} sent this run, "
                f"{result['n_skipped']} already judged."
            ),
        )
    # ``result["run_id"]`` is the judged run (also ``responses_run_id``); report ours.
    return {**result, "run_id": run_id}


__all__ = ["gptflow_judge", "judge_fix", "latest_responses_run", "rescore_task"]
