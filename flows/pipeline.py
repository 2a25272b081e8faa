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

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.config import DEFAULT_PROFILE, PipelineConfig, build_config, config_to_dict
from gpt.paths import artifacts_dir, datasets_dir, default_db_path, project_root
from tasks.catalog import Catalog
from tasks.stages import (
    RunContext,
    baseline_spam_task,
    download_task,
    extract_responses_task,
    finetune_instruct_task,
    finetune_spam_task,
    judge_task,
    load_gpt2_task,
    pretrain_task,
    tokenize_task,
)


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


@flow(name="gptflow-pipeline", log_prints=True, validate_parameters=True)
def gptflow_pipeline(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    config: PipelineConfig | None = None,
    mirror: str | None = None,
    force: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline. ``config`` (a full typed config) wins over ``profile`` +
    ``overrides``; ``force`` names stages to recompute even when cached."""
    log = get_run_logger()
    cfg = config if config is not None else build_config(profile, overrides)
    run_id = str(flow_run.get_id() or os.urandom(8).hex())
    ctx = RunContext(
        run_id=run_id,
        db_path=str(default_db_path()),
        artifacts=str(artifacts_dir()),
        datasets=str(datasets_dir()),
        mirror=mirror or cfg.download.mirror or os.environ.get("GPTFLOW_MIRROR"),
        device=cfg.device,
        force=tuple(force or ()),
        progress=progress,
    )
    cat = Catalog(ctx.db_path)
    cat.start_run(
        run_id,
        flow_run_id=run_id,
        profile=cfg.profile,
        config=config_to_dict(cfg),
        git_rev=git_revision(),
    )
    log.info("run %s: profile %s, base model %s", run_id, cfg.profile, cfg.load_gpt2.base_model)
    try:
        dl = download_task(ctx, cfg.download)
        tok = tokenize_task(ctx, cfg.tokenize, dl)
        pre = pretrain_task(ctx, cfg.pretrain, tok)
        base = load_gpt2_task(ctx, cfg.load_gpt2, cfg.download, tok, pre)
        spam_f = finetune_spam_task.submit(ctx, cfg.finetune_spam, tok, base)
        base_f = baseline_spam_task.submit(ctx, cfg.baseline_spam, tok)
        spam, baseline = spam_f.result(), base_f.result()
        inst = finetune_instruct_task(ctx, cfg.finetune_instruct, tok, base)
        resp = extract_responses_task(ctx, cfg.extract_responses, tok, inst)
        judged = judge_task(ctx, cfg.judge, resp)
    except BaseException:
        cat.end_run(run_id, "failed")
        raise
    cat.end_run(run_id, "completed")
    # issue 12: regression gates, evaluated and stored before the report shows them
    from tasks.gates import raise_for_gates, run_gates

    gate_results = run_gates(cat, run_id, cfg.gates)
    outputs = {
        "tokenize": tok,
        "pretrain": pre,
        "load_gpt2": base,
        "finetune_spam": spam,
        "baseline_spam": baseline,
        "finetune_instruct": inst,
        "extract_responses": resp,
    }
    try:
        from flows.report import publish_report

        publish_report(cat, run_id, cfg, outputs, judged)
    except Exception as exc:  # a report must never fail a finished run
        log.warning("could not publish the run report: %s", exc)
    # issue 12: a failed gate fails the flow run, after every result is stored
    raise_for_gates(run_id, gate_results, cfg.gates)
    return {"run_id": run_id, "status": "completed", "judge": judged}


def stage_statuses(run_id: str) -> dict[str, dict[str, Any]]:
    """Status and message of each stage of a run, from the catalog."""
    df = Catalog().query_df(
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
    progress: bool = True,
) -> dict[str, Any]:
    """Run the flow and return {run_id, status, stages}. Raises config errors before any
    work; a failed stage gives status 'failed' with the stage's message."""
    cfg = build_config(profile, overrides, base=base_config)
    state = gptflow_pipeline(
        profile=cfg.profile,
        config=cfg,
        mirror=mirror,
        force=force or [],
        progress=progress,
        return_state=True,
    )
    run_id = str(state.state_details.flow_run_id)
    status = "completed" if state.is_completed() else "failed"
    result: dict[str, Any] = {"run_id": run_id, "status": status}
    try:
        result["stages"] = stage_statuses(run_id)
    except Exception:
        result["stages"] = {}
    if status == "failed":
        result["error"] = state.message
    return result


__all__ = ["git_revision", "gptflow_pipeline", "run_pipeline"]
