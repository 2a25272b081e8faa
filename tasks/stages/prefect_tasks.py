"""The stages as Prefect tasks: thin wrappers around :func:`tasks.stages.runner.run_stage`
(or, for a stage placed on a work pool, :func:`tasks.stages.placement.run_placed`), one
task name per stage so the UI shows the DAG."""

from __future__ import annotations

from functools import cache
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from gpt.config import Args
from gpt.errors import GPTFlowError, WorkerDiedError
from tasks.records.run_state import worker_died_reason
from tasks.stages.contract import RunContext, StageOutput, StageSkipped
from tasks.stages.placement import run_placed
from tasks.stages.runner import load_spec, run_stage


def _retry_unexpected_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a gptflow error (bad input, a missing server, a
    download that failed at every location after the downloader's own retries) fails
    the same way again."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, GPTFlowError)


def skipped_info(value: Any) -> dict[str, Any] | None:
    """For what a stage task returned: the skip record when the stage was skipped (the
    task ends in a Completed state named Skipped), else None."""
    if isinstance(value, State):
        data = value.data if isinstance(value.data, dict) else {}
        return {"status": "skipped", "message": value.message, **data}
    if isinstance(value, dict) and value.get("status") == "skipped":
        return value
    return None


@cache
def stage_task(name: str, pool: str | None = None) -> Task:
    """The Prefect task that runs stage ``name``: in this process, or with ``pool`` on a
    worker of that work pool (:mod:`tasks.stages.placement`)."""
    spec = load_spec(name)

    def fn(ctx: RunContext, args: Args, **inputs: StageOutput | None) -> Any:
        try:
            if pool is not None:
                return run_placed(ctx, pool, name, args, **inputs)
            return run_stage(ctx, name, args, **inputs)
        except StageSkipped as skip:  # shown as a Completed state named "Skipped"
            info = {"status": "skipped", "stage": name, "message": str(skip)}
            return Completed(name="Skipped", message=str(skip), data=info)
        except OSError as exc:  # e.g. a broken pipe: say so when the worker died
            died = worker_died_reason()
            if died is not None:
                raise WorkerDiedError(died) from exc
            raise

    fn.__name__ = name
    return task(
        name=name,
        retries=spec.retries,
        retry_delay_seconds=5,
        retry_condition_fn=_retry_unexpected_only,
        cache_policy=NO_CACHE,
    )(fn)
