"""Stages placed on Prefect work pools (``PipelineConfig.placement``).

A placed stage runs as a flow run of the deployment ``gptflow-stage/<pool>``
(:mod:`flows.stage_flow`), started by the flow's stage task with Prefect's
``run_deployment`` and picked up by a worker of that pool. Both sides call the same
:func:`tasks.stages.runner.run_stage`, so the cache key, the lease, the cache hit and the
rows are exactly those of the stage run in-process. Nothing comes back through Prefect's
results (a child's return value is unreadable without result storage both machines
reach): the worker commits the stage folder to the shared artifacts store and writes a
small report; the flow reads the report, checks the key, and reads the committed
manifest itself. The run's context and the input stages' results travel as the flow
run's parameters, in the JSON of :mod:`gpt.distributed.codec`.

Why one deployment per *pool* and the stage as a parameter: Prefect 3.9.1's
``run_deployment`` cannot move a flow run to another pool (``work_queue_name`` is looked
up — and created — inside the deployment's own pool; ``job_variables`` only change the
job), so the pool must be chosen by choosing the deployment, and a deployment per pool is
the fewest that can do it.

Files, under the artifacts folder (shared by every machine, at the same path or URL):

- ``runs/placed/<child flow run id>/<run_id>.json``: the run record the placed stage
  writes (its catalog rows go to the catalog as usual). The run's own record file keeps
  one writer, the flow, which copies the stage's final row into it.
- ``runs/placed/<child flow run id>/report.json``: who ran the stage (host, worker, pid),
  the key it computed and how it ended.

Without a placement nothing here is called: an unplaced run makes no extra API call.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from gpt.config import Args
from gpt.errors import GPTFlowError
from gpt.fileio import atomic_open
from gpt.paths import is_remote
from tasks.records.runs import StageRecord, StageStatus, parse_ts, placed_records_dir
from tasks.stages.contract import RunContext, StageOutput, StageSkipped, logger
from tasks.stages.runner import committed_output, key_parts, load_spec, run_stage
from tasks.store.fingerprint import code_fingerprint

log = logging.getLogger(__name__)

#: The flow a placed stage runs in (``flows/stage_flow.py``).
STAGE_FLOW = "gptflow-stage"
#: Seconds between two looks at a placed stage's flow run.
POLL_S = float(os.environ.get("GPTFLOW_PLACEMENT_POLL_S", "1"))
REPORT = "report.json"
REPORT_VERSION = 1


class PlacementError(GPTFlowError):
    """A placed stage cannot run or its result cannot be used (not retried)."""


class PlacedStageCrashed(RuntimeError):
    """A placed stage's flow run ended without a report (its process or worker died), or
    failed with an unexpected error: the stage task retries it like an in-process one."""


def deployment_name(pool: str) -> str:
    """The deployment that runs placed stages on work pool ``pool``."""
    return f"{STAGE_FLOW}/{pool}"


def _write_json(folder: str | Path, name: str, value: dict[str, Any]) -> None:
    """``folder/name`` as JSON: a local file written atomically, or an object."""
    data = json.dumps(value, indent=1, sort_keys=True, default=str)
    if is_remote(folder):
        from tasks.store.objects import ObjectRoot

        ObjectRoot(str(folder)).put(name, data.encode("utf-8"))
        return
    with atomic_open(Path(folder) / name, "w", encoding="utf-8") as fh:
        fh.write(data)


def _read_json(folder: str | Path, name: str) -> dict[str, Any] | None:
    """``folder/name`` as JSON, or None when absent or unreadable."""
    try:
        if is_remote(folder):
            from tasks.store.objects import ObjectRoot

            got = ObjectRoot(str(folder)).get(name)
            return None if got is None else json.loads(got.data)
        return json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def run_placed_here(
    ctx: RunContext,
    name: str,
    args: Args,
    inputs: dict[str, StageOutput | None],
    *,
    key: str,
    code: str,
) -> dict[str, Any]:
    """Run stage ``name`` in this (worker's) process, as the flow asked (``ctx`` is the
    run's context :meth:`~tasks.stages.contract.RunContext.placed_on` this flow run):
    refuse when this machine computes another key than the flow did, else
    :func:`run_stage`. Writes the report the flow reads back, and returns it. Raises
    what the stage raised (a skip is reported, not raised)."""
    from gpt.distributed.codec import encode

    assert ctx.placed_flow_run is not None
    folder = placed_records_dir(ctx.artifacts, ctx.placed_flow_run)
    spec = load_spec(name)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "stage": name,
        "run_id": ctx.run_id,
        "flow_run_id": ctx.placed_flow_run,
        "expected_key": key,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "worker": os.environ.get("PREFECT__WORKER_NAME"),
        "started": time.time(),
    }
    mine = key_parts(spec, args, inputs, ctx).key
    report["key"] = mine
    if mine != key:
        here = code_fingerprint(spec.module)
        why = (
            f"the code differs (fingerprint of {spec.module} here {here[:12]}, on the "
            f"flow's machine {code[:12]})"
            if here != code
            else "the settings, the versions of the packages its code imports or the input "
            "files differ here (another gptflow or package version, or other datasets)"
        )
        message = (
            f"stage {name}: this worker ({report['host']}) computes key {mine}, the flow "
            f"computed {key}: {why}. Run the same gptflow commit on the flow's machine "
            "and on every worker"
        )
        _write_json(folder, REPORT, {**report, "outcome": "refused", "message": message})
        raise PlacementError(message)
    try:
        result = run_stage(ctx, name, args, **inputs)
    except StageSkipped as skip:
        report.update(outcome="skipped", message=str(skip))
    except BaseException as exc:
        report.update(
            outcome="failed",
            message=f"{type(exc).__name__}: {exc}"[:4000],
            retryable=not isinstance(exc, GPTFlowError),
        )
        raise
    else:
        assert result is not None
        report.update(
            outcome="done",
            committed=Path(result.root) == ctx.store.final_dir(name, key),
            result=encode(result, "result"),
        )
    finally:
        report["row"] = ((ctx.recorder.read(ctx.run_id) or {}).get("stages") or {}).get(name)
        report["ended"] = time.time()
        if "outcome" in report:
            _write_json(folder, REPORT, report)
    return report


# --------------------------------------------------------------------------- the flow side


def check_placement(placement: dict[str, str]) -> None:
    """Before any compute: each pool named in ``placement`` has its stage deployment
    (else :class:`PlacementError` with the fix); a pool without a worker online is
    logged (its stages wait until one starts)."""
    if not placement:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        for pool in sorted(set(placement.values())):
            stages = ", ".join(s for s, p in placement.items() if p == pool)
            try:
                dep = client.read_deployment_by_name(deployment_name(pool))
            except ObjectNotFound:
                raise PlacementError(
                    f"placement puts {stages} on work pool {pool!r}, but the server has no "
                    f"deployment {deployment_name(pool)}: add it to prefect.yaml (a copy of "
                    "the gptflow-stage entries with this pool) and run `gptflow deploy`"
                ) from None
            if dep.work_pool_name != pool:
                raise PlacementError(
                    f"deployment {deployment_name(pool)} is on work pool "
                    f"{dep.work_pool_name!r}, not {pool!r}: fix it in prefect.yaml and run "
                    "`gptflow deploy`"
                )
            try:
                workers = client.read_workers_for_work_pool(pool)
            except PrefectHTTPStatusError:  # the pool is gone: the warning below says so
                workers = []
            if not any(str(w.status).upper().endswith("ONLINE") for w in workers):
                logger().warning(
                    "work pool %r has no worker online: %s will wait until one starts "
                    "(`prefect worker start --pool %s` on a machine sharing the artifacts)",
                    pool,
                    stages,
                    pool,
                )


def run_placed(
    ctx: RunContext, pool: str, name: str, args: Args, **inputs: StageOutput | None
) -> StageOutput:
    """Stage ``name`` for the flow, computed on a worker of ``pool`` (a cache hit is served
    here: it needs no worker). Returns what :func:`run_stage` would; raises
    :class:`StageSkipped` for a skipped stage."""
    from gpt.distributed.codec import encode

    cached = run_stage(ctx, name, args, cached_only=True, **inputs)
    if cached is not None:
        return cached
    from prefect.deployments import run_deployment

    spec = load_spec(name)
    key = key_parts(spec, args, inputs, ctx).key
    waiting = f"placed on work pool {pool}: waiting for a worker"
    ctx.recorder.record(StageRecord(ctx.run_id, name, message=waiting))
    logger().info("%s: running on work pool %s (key %s)", name, pool, key)
    flow_run = run_deployment(
        deployment_name(pool),
        parameters={
            "stage": name,
            "settings": args.to_dict(),
            "context": encode(ctx, "run context"),
            "inputs": encode(dict(sorted(inputs.items())), "inputs"),
            "key": key,
            "code": code_fingerprint(spec.module),
        },
        flow_run_name=f"{name}-{ctx.run_id[:8]}",
        tags=["gptflow", f"stage:{name}"],
        poll_interval=POLL_S,
        timeout=None,
    )
    return collect(ctx, name, key, flow_run)


def _where(flow_run: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """Where a placed stage ran, for its ``stages`` row."""
    labels = getattr(flow_run, "labels", None) or {}
    report = report or {}
    return {
        "pool": flow_run.work_pool_name,
        "worker": labels.get("prefect.worker.name") or report.get("worker"),
        "host": report.get("host"),
        "pid": report.get("pid"),
        "flow_run_id": str(flow_run.id),
    }


def collect(ctx: RunContext, name: str, key: str, flow_run: Any) -> StageOutput:
    """Read a finished placed stage back through the artifacts store: its report, then
    its committed folder under ``key`` (the key the flow computed; a report of another
    key is refused). Records the stage's final row, with where it ran, in the run's
    record and the catalog."""
    from gpt.distributed.codec import decode

    rec = ctx.recorder
    folder = placed_records_dir(ctx.artifacts, str(flow_run.id))
    report = _read_json(folder, REPORT)
    where = _where(flow_run, report)
    state = flow_run.state
    desc = f"work pool {where['pool']}, worker {where['worker']}, flow run {flow_run.id}"
    if report is None:
        message = (
            f"{name} on {desc} ended {state.name if state else 'without a state'} without a "
            f"report in {folder} ({state.message if state else ''}); does the worker see the "
            f"artifacts folder {ctx.artifacts}?"
        )
        rec.record(StageRecord(ctx.run_id, name, "failed", outputs=where, message=message))
        raise PlacedStageCrashed(message)
    row = report.get("row") or {}
    raw = row.get("outputs")
    outputs = {**((json.loads(raw) if isinstance(raw, str) else raw) or {}), **where}

    placed = StageRecord(
        ctx.run_id,
        name,
        started_at=parse_ts(row.get("started_at")),
        ended_at=parse_ts(row.get("ended_at")),
        cache_hit=row.get("cache_hit"),
        outputs=outputs,
    )

    def record(status: StageStatus, message: str | None) -> None:
        rec.record(placed.then(status, message=message))

    outcome = report.get("outcome")
    message = report.get("message")
    if outcome == "refused" or report.get("key") != key:
        message = message or (
            f"stage {name}: the worker computed key {report.get('key')}, the flow {key}: "
            "run the same gptflow commit on the flow's machine and every worker"
        )
        record("failed", message)
        raise PlacementError(message)
    if outcome == "skipped":
        record("skipped", message)
        raise StageSkipped(message or f"{name} skipped on {desc}")
    if outcome != "done":
        message = f"{name} failed on {desc}: {message}"
        record("failed", message)
        if report.get("retryable"):
            raise PlacedStageCrashed(message)
        raise PlacementError(message)
    hit = bool(row.get("cache_hit"))
    if report.get("committed"):
        result, reason = committed_output(ctx, name, key, cache_hit=hit)
        if result is None:
            message = (
                f"{name} finished on {desc}, but its result under key {key} is "
                f"{reason or 'not in ' + str(ctx.store.final_dir(name, key))}: does the "
                f"worker write to the same artifacts folder ({ctx.artifacts})?"
            )
            record("failed", message)
            raise PlacementError(message)
    else:  # an incomplete result (StageIncomplete): not committed, described by the report
        result = decode(report["result"], "result")
    record(row.get("status") or ("cached" if hit else "completed"), row.get("message"))
    logger().info("%s: done on %s", name, desc)
    return result
