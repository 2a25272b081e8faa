"""The ``gptflow-pipeline`` flow: download → tokenize → pretrain → load_gpt2 →
finetune_spam ‖ baseline_spam → finetune_instruct → extract_responses → judge.

Every future is resolved, so a failed task fails the flow; the flow run id is the
catalog's run id, and ``runs``/``stages`` record profile, config, git revision, status,
timings, cache hits and outputs. Every run ends ``completed``, ``failed`` or ``crashed``
with the reason — settings that fail once the flow run started included — and a run whose
worker died ends the flow run Crashed, saying so (:meth:`RunRecorder.running`). A
markdown report and table artifacts summarise the run.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Literal

from prefect import Task, flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Crashed, State
from pydantic import StrictBool, StrictStr

from flows.config import (
    DEFAULT_PROFILE,
    STAGES,
    PipelineConfig,
    build_config,
    config_to_dict,
)
from flows.run_logs import route_library_logs
from flows.run_setup import preflight_required_judge
from gpt.errors import ConfigError, GPTFlowError
from gpt.paths import artifacts_root, datasets_dir, project_root
from tasks.cache import StageOutput, root_child
from tasks.catalog import Catalog
from tasks.flow_tasks import skipped_info, stage_task
from tasks.gates import raise_for_gates, run_gates
from tasks.placement import check_placement
from tasks.run_state import worker_died_reason
from tasks.runlog import RunRecorder
from tasks.stages.base import RunContext


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has local changes), if any."""
    root = project_root()
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def make_context(
    cfg: PipelineConfig,
    run_id: str,
    *,
    mirror: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    verify: str = "auto",
    progress: bool = True,
    retrust: list[str] | tuple[str, ...] = (),
) -> RunContext:
    """The run's context: where its catalog, artifacts and inputs are, and how to run."""
    from gpt.data.trust import retrust_paths

    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: no such stage; stages: {', '.join(STAGES)}")
    retrust_paths(retrust)  # an unknown or pinned name: an error up front
    return RunContext(
        run_id=run_id,
        catalog_settings=cfg.catalog.resolve().pinned().without_secrets(),
        artifacts=artifacts_root(),
        datasets=str(datasets_dir()),
        mirror=mirror or cfg.download.mirror or os.environ.get("GPTFLOW_MIRROR") or None,
        device=cfg.device,
        force=tuple(force),
        verify="full" if verify == "full" else "auto",
        progress=progress,
        download=cfg.download,
        judge=cfg.judge.model_dump(mode="json"),
        retrust=tuple(retrust),
    )


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
) -> dict[str, Any]:
    """The whole pipeline. ``config`` (a full typed config) wins over ``profile`` +
    ``overrides``; ``force`` names stages to recompute even when cached; ``verify="full"``
    re-hashes every file of a cached result before trusting it; ``retrust`` accepts a
    changed download of the trust-on-first-use files it names. Parameters are validated
    strictly, as every setting (a deployment's ``"yes"`` is not a boolean)."""
    log = get_run_logger()
    route_library_logs()  # library INFO lines reach this run's logs (also for workers)
    run_id = str(flow_run.get_id() or os.urandom(8).hex())
    try:
        cfg = config if config is not None else build_config(profile, overrides)
        ctx = make_context(cfg, run_id, mirror=mirror, force=force or (), verify=verify,
                           progress=progress, retrust=retrust or ())  # fmt: skip
    except GPTFlowError as exc:  # bad settings in a started flow run: a failed run too
        record_failed_start(run_id, profile, exc)
        raise
    # record where the inputs really came from (the run's mirror, if any)
    cfg = cfg.replace(download=cfg.download.replace(mirror=ctx.mirror))
    rec = ctx.recorder

    def step(name: str) -> Task:  # a placed stage runs on a worker of its work pool
        return stage_task(name, cfg.placement.get(name))

    try:
        with rec.running(
            run_id,
            flow_run_id=run_id,
            profile=cfg.profile,
            config=config_to_dict(cfg),
            git_rev=git_revision(),
        ):
            log.info(
                "run %s: profile %s, base model %s", run_id, cfg.profile, cfg.load_gpt2.base_model
            )
            preflight_required_judge(rec, run_id, cfg)  # judge.required: check before compute
            check_placement(cfg.placement)  # each pool's stage deployment exists
            dl = step("download")(ctx, cfg.download)
            tok = step("tokenize")(ctx, cfg.tokenize, download=dl)
            pre = step("pretrain")(ctx, cfg.pretrain, tokenize=tok)
            scratch = cfg.load_gpt2.base_model == "scratch"
            base = step("load_gpt2")(
                ctx, cfg.load_gpt2, tokenize=tok, pretrain=pre if scratch else None
            )
            spam_f = step("finetune_spam").submit(
                ctx, cfg.finetune_spam, tokenize=tok, load_gpt2=base
            )
            base_f = step("baseline_spam").submit(ctx, cfg.baseline_spam, tokenize=tok)
            spam_f.result(), base_f.result()  # resolve both: a failed one fails the flow
            inst = step("finetune_instruct")(
                ctx, cfg.finetune_instruct, tokenize=tok, load_gpt2=base
            )
            resp = step("extract_responses")(
                ctx, cfg.extract_responses, tokenize=tok, finetune_instruct=inst
            )
            judged = step("judge")(ctx, cfg.judge, extract_responses=resp)
    except BaseException as exc:
        return crashed_state(exc)  # the worker died: the flow run is Crashed, saying so
    judge_info = _judge_info(run_id, judged)
    # regression gates, evaluated and stored before the report shows them
    gate_results = run_gates(ctx.catalog, run_id, cfg.gates, recorder=rec)
    try:
        from flows.report import publish_report

        publish_report(ctx.catalog, run_id)  # the report reads everything from the catalog
    except Exception as exc:  # a report must never fail a finished run
        log.warning("could not publish the run report: %s", exc)
    # a failed gate fails the flow run (automations fire), after every result is stored
    raise_for_gates(run_id, gate_results, cfg.gates)
    return {"run_id": run_id, "status": "completed", "judge": judge_info}


def record_failed_start(run_id: str, profile: str | None, exc: BaseException) -> None:
    """Record a flow run whose settings failed before its run could start as a ``failed``
    run (in the catalog and artifacts the environment selects), so that it shows in
    ``gptflow runs`` with the reason. Best effort: a broken catalog setting is logged."""
    try:
        rec = RunRecorder(Catalog(), root_child(artifacts_root(), "runs"))
        with rec.running(run_id, flow_run_id=run_id, profile=profile, config=None, git_rev=None):
            raise exc
    except Exception as err:
        if err is not exc:
            get_run_logger().warning("could not record the failed run %s: %s", run_id, err)


def crashed_state(exc: BaseException) -> State:
    """A Crashed state saying why, when ``exc`` ended the run because the process that
    started it (the worker) died; otherwise ``exc`` is raised again."""
    died = worker_died_reason()
    if died is None:
        raise exc
    return Crashed(message=died)


def _judge_info(run_id: str, judged: Any) -> dict[str, Any]:
    """The judge stage's result for the report (a skipped stage gives its message)."""
    if isinstance(judged, StageOutput):
        return {"status": "completed", **judged.data}
    return skipped_info(judged) or {"status": "unknown"}


def stage_statuses(run_id: str, catalog: Catalog | None = None) -> dict[str, dict[str, Any]]:
    """Status and message of each stage of a run, from ``catalog`` (default: the one
    the environment selects)."""
    df = (catalog or Catalog()).query_df(
        "SELECT stage, status, cache_hit, message FROM stages WHERE run_id = ? ORDER BY started_at",
        [run_id],
    )
    out = {}
    for r in df.to_dict("records"):
        msg = r["message"]
        out[r["stage"]] = {
            "status": r["status"],
            "cache_hit": bool(r["cache_hit"]) if r["cache_hit"] is not None else False,
            "message": msg if isinstance(msg, str) else None,
        }
    return out


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


__all__ = [
    "crashed_state",
    "git_revision",
    "gptflow_pipeline",
    "record_failed_start",
    "run_pipeline",
]
