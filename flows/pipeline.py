"""The ``gptflow-pipeline`` flow: download → tokenize → pretrain → load_gpt2 →
finetune_spam ‖ baseline_spam → finetune_instruct → extract_responses → judge.

Every future is resolved, so a failed task fails the flow; the flow run id is the
catalog's run id, and ``runs``/``stages`` record profile, config, git revision, status,
timings, cache hits and outputs. A markdown report and table artifacts summarise the run.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.runtime import flow_run

from flows.config import (
    DEFAULT_PROFILE,
    STAGES,
    PipelineConfig,
    build_config,
    config_to_dict,
)
from flows.run_logs import route_library_logs
from flows.run_setup import preflight_required_judge
from gpt.errors import ConfigError
from gpt.paths import artifacts_root, datasets_dir, project_root
from tasks.cache import StageOutput
from tasks.catalog import Catalog
from tasks.flow_tasks import skipped_info, stage_task
from tasks.gates import raise_for_gates, run_gates
from tasks.placement import check_placement
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
) -> RunContext:
    """The run's context: where its catalog, artifacts and inputs are, and how to run."""
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: no such stage; stages: {', '.join(STAGES)}")
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
    )


@flow(name="gptflow-pipeline", log_prints=True, validate_parameters=True)
def gptflow_pipeline(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    config: PipelineConfig | None = None,
    mirror: str | None = None,
    force: list[str] | None = None,
    verify: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline. ``config`` (a full typed config) wins over ``profile`` +
    ``overrides``; ``force`` names stages to recompute even when cached; ``verify="full"``
    re-hashes every file of a cached result before trusting it."""
    log = get_run_logger()
    route_library_logs()  # library INFO lines reach this run's logs (also for workers)
    cfg = config if config is not None else build_config(profile, overrides)
    run_id = str(flow_run.get_id() or os.urandom(8).hex())
    ctx = make_context(cfg, run_id, mirror=mirror, force=force or (), verify=verify,
                       progress=progress)  # fmt: skip
    # record where the inputs really came from (the run's mirror, if any)
    cfg = cfg.replace(download=cfg.download.replace(mirror=ctx.mirror))
    rec = ctx.recorder
    rec.start_run(
        run_id,
        flow_run_id=run_id,
        profile=cfg.profile,
        config=config_to_dict(cfg),
        git_rev=git_revision(),
    )
    log.info("run %s: profile %s, base model %s", run_id, cfg.profile, cfg.load_gpt2.base_model)

    def step(name: str) -> Task:  # a placed stage runs on a worker of its work pool
        return stage_task(name, cfg.placement.get(name))

    try:
        preflight_required_judge(rec, run_id, cfg)  # judge.required: check before compute
        check_placement(cfg.placement)  # each pool's stage deployment exists
        dl = step("download")(ctx, cfg.download)
        tok = step("tokenize")(ctx, cfg.tokenize, download=dl)
        pre = step("pretrain")(ctx, cfg.pretrain, tokenize=tok)
        scratch = cfg.load_gpt2.base_model == "scratch"
        base = step("load_gpt2")(
            ctx, cfg.load_gpt2, tokenize=tok, pretrain=pre if scratch else None
        )
        spam_f = step("finetune_spam").submit(ctx, cfg.finetune_spam, tokenize=tok, load_gpt2=base)
        base_f = step("baseline_spam").submit(ctx, cfg.baseline_spam, tokenize=tok)
        spam_f.result(), base_f.result()  # resolve both: a failed one fails the flow
        inst = step("finetune_instruct")(ctx, cfg.finetune_instruct, tokenize=tok, load_gpt2=base)
        resp = step("extract_responses")(
            ctx, cfg.extract_responses, tokenize=tok, finetune_instruct=inst
        )
        judged = step("judge")(ctx, cfg.judge, extract_responses=resp)
    except BaseException:
        rec.end_run(run_id, "failed")
        raise
    rec.end_run(run_id, "completed")
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
) -> dict[str, Any]:
    """Run the flow and return {run_id, status, stages}. Raises config errors before any
    work; a failed stage gives status 'failed' with the stage's message."""
    cfg = build_config(profile, overrides, base=base_config)
    ctx = make_context(cfg, "check", force=force or ())  # a bad --force: an error up front
    state = gptflow_pipeline(
        profile=cfg.profile,
        config=cfg,
        mirror=mirror,
        force=force or [],
        verify=verify,
        progress=progress,
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


__all__ = ["git_revision", "gptflow_pipeline", "run_pipeline"]
