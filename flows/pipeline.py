"""The ``gptflow-pipeline`` flow: download → tokenize → pretrain → load_gpt2 →
finetune_spam ‖ baseline_spam → finetune_instruct → extract_responses → judge.

Every future is resolved, so a failed task fails the flow. The run is recorded through
:class:`~flows.run_start.FlowRun` (its id is the flow run's; ``runs`` and ``stages`` hold
profile, config, git revision, status with the reason, timings, cache hits and outputs).
After the stages the regression gates are stored, then a markdown report and table
artifacts summarise the run.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import Task, flow, get_run_logger
from prefect.states import State
from pydantic import StrictBool, StrictStr

from flows.config import PipelineConfig, build_config
from flows.profiles import DEFAULT_PROFILE
from flows.run_start import FlowRun, make_context
from gpt.errors import JudgeError
from tasks.catalog import Catalog, catalog_session, utcnow
from tasks.records.gate_results import raise_for_gates, run_gates
from tasks.records.runs import StageRecord
from tasks.stages import STAGES
from tasks.stages.contract import RunContext, StageOutput
from tasks.stages.placement import check_placement
from tasks.stages.prefect_tasks import skipped_info, stage_task


@flow(name="gptflow-pipeline", log_prints=True, validate_parameters=True)
def gptflow_pipeline(
    profile: StrictStr = DEFAULT_PROFILE,
    overrides: list[StrictStr] | None = None,
    config: PipelineConfig | None = None,
    mirror: StrictStr | None = None,
    force: list[StrictStr] | None = None,
    verify: Literal["auto", "full"] = "auto",
    progress: StrictBool = True,
    retrust: list[StrictStr] | None = None,
) -> dict[str, Any] | State:
    """The whole pipeline. ``config`` (a full typed config) wins over ``profile`` +
    ``overrides``; ``force`` names stages to recompute even when cached; ``verify="full"``
    re-hashes every file of a cached result before trusting it; ``retrust`` accepts a
    changed download of the trust-on-first-use files it names. Parameters are validated
    strictly, as every setting (a deployment's ``"yes"`` is not a boolean). The run
    keeps one write connection to a catalog file while it is busy (:func:`catalog_session`)."""
    with catalog_session():
        run = FlowRun.start(
            profile,
            lambda: config if config is not None else build_config(profile, overrides),
            mirror=mirror,
            force=force or (),
            verify=verify,
            progress=progress,
            retrust=retrust or (),
        )
        judged = run.record(lambda: run_stages(run.cfg, run.ctx))
        if isinstance(judged, State) and judged.is_crashed():
            return judged  # the worker died: the flow run is Crashed, saying so
        cat, rec = run.ctx.catalog, run.ctx.recorder
        # regression gates, evaluated and stored before the report shows them
        gate_results = run_gates(cat, run.run_id, run.cfg.gates, recorder=rec)
        try:
            from flows.report.publish import publish_report

            publish_report(cat, run.run_id)  # the report reads everything from the catalog
        except Exception as exc:  # a report must never fail a finished run
            get_run_logger().warning("could not publish the run report: %s", exc)
        # a failed gate fails the flow run (automations fire), after every result is stored
        raise_for_gates(run.run_id, gate_results, run.cfg.gates)
        return {"run_id": run.run_id, "status": "completed", "judge": _judge_info(judged)}


def run_stages(cfg: PipelineConfig, ctx: RunContext) -> Any:
    """The DAG: every stage in order (the two spam stages side by side); returns what the
    judge stage returned."""
    get_run_logger().info(
        "run %s: profile %s, base model %s", ctx.run_id, cfg.profile, cfg.load_gpt2.base_model
    )
    preflight_required_judge(ctx, cfg)  # judge.required: check before any compute
    check_placement(cfg.placement)  # each pool's stage deployment exists

    def step(name: str) -> Task:  # a placed stage runs on a worker of its work pool
        return stage_task(name, cfg.placement.get(name))

    dl = step("download")(ctx, cfg.download)
    tok = step("tokenize")(ctx, cfg.tokenize, download=dl)
    pre = step("pretrain")(ctx, cfg.pretrain, tokenize=tok)
    scratch = cfg.load_gpt2.base_model == "scratch"
    base = step("load_gpt2")(ctx, cfg.load_gpt2, tokenize=tok, pretrain=pre if scratch else None)
    spam_f = step("finetune_spam").submit(ctx, cfg.finetune_spam, tokenize=tok, load_gpt2=base)
    base_f = step("baseline_spam").submit(ctx, cfg.baseline_spam, tokenize=tok)
    spam_f.result(), base_f.result()  # resolve both: a failed one fails the flow
    inst = step("finetune_instruct")(ctx, cfg.finetune_instruct, tokenize=tok, load_gpt2=base)
    resp = step("extract_responses")(
        ctx, cfg.extract_responses, tokenize=tok, finetune_instruct=inst
    )
    return step("judge")(ctx, cfg.judge, extract_responses=resp)


def preflight_required_judge(ctx: RunContext, cfg: PipelineConfig) -> None:
    """With ``judge.required`` true, check the Ollama server and the judge model before
    any compute, so that the nightly fails in seconds, not after hours of training. On
    failure the run's ``judge`` stage is recorded ``failed`` with the fix and the error
    is raised."""
    if not cfg.judge.required:
        return
    from gpt.eval.judge.hosts import preflight

    started = utcnow()
    try:
        preflight(cfg.judge, progress=False)
    except JudgeError as exc:
        msg = (
            f"{exc} — checked when the run started because judge.required is true; nothing "
            "was computed. Fix that, then start the run again (or set judge.required=false "
            "to run without the judge and score later with `gptflow rerun judge`)"
        )
        ctx.recorder.record(
            StageRecord(
                ctx.run_id, "judge", "failed", started_at=started, ended_at=utcnow(), message=msg
            )
        )
        raise type(exc)(msg) from None


def _judge_info(judged: Any) -> dict[str, Any]:
    """The judge stage's result for the flow's return value (a skipped stage gives its
    message)."""
    if isinstance(judged, StageOutput):
        return {"status": "completed", **judged.data}
    return skipped_info(judged) or {"status": "unknown"}


def stage_statuses(run_id: str, catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Status, cache hit and message of each stage of a run, in the pipeline's order."""
    rows = catalog.query_rows(
        "SELECT stage, status, cache_hit, message FROM stages WHERE run_id = ? "
        "ORDER BY started_at, stage",
        [run_id],
    )
    rank = {s: i for i, s in enumerate(STAGES)}
    rows.sort(key=lambda r: rank.get(r["stage"], len(rank)))
    return {
        r["stage"]: {
            "status": r["status"],
            "cache_hit": bool(r["cache_hit"]),
            "message": r["message"] if isinstance(r["message"], str) else None,
        }
        for r in rows
    }


def run_pipeline(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    *,
    base_config: dict[str, Any] | None = None,
    mirror: str | None = None,
    force: list[str] | None = None,
    verify: str = "auto",
    progress: bool = True,
    retrust: list[str] | None = None,
) -> dict[str, Any]:
    """Run the flow and return {run_id, status, stages}. Raises config errors before any
    work; a failed stage gives status 'failed' with the stage's message."""
    cfg = build_config(profile, overrides, base=base_config)
    # a bad --force or --retrust: an error up front
    ctx = make_context(cfg, "check", force=force or (), retrust=retrust or ())
    with catalog_session():  # the flow's connection serves the summary below too
        state = gptflow_pipeline(
            profile=cfg.profile,
            config=cfg,
            mirror=mirror,
            force=force or [],
            verify=verify,
            progress=progress,
            retrust=retrust or [],
            return_state=True,
        )
        run_id = str(state.state_details.flow_run_id)
        status = "completed" if state.is_completed() else "failed"
        result: dict[str, Any] = {"run_id": run_id, "status": status}
        try:
            result["stages"] = stage_statuses(run_id, ctx.catalog)
        except Exception:
            result["stages"] = {}
        if status == "failed":
            result["error"] = state.message
        return result
