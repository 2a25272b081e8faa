"""The ``gptflow-stage`` flow: one stage of a pipeline run, on a worker of a work pool.

The pipeline starts it (``tasks.stages.placement.run_placed``) for each stage its
``placement`` puts on a pool, through the deployment ``gptflow-stage/<pool>`` in
``prefect.yaml``. Everything it needs arrives as JSON parameters: the stage, its settings
section, the run's context and the input stages' results (where their folders are, their
digests, their typed results), plus the key and code fingerprint the flow computed. It
refuses to run when this machine computes another key; otherwise it runs the stage the
way the flow does in its own process, and reports back through the shared artifacts
folder (not through Prefect's results).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.config import PipelineConfig
from flows.run_logs import route_library_logs
from gpt.config import Args
from gpt.distributed.codec import decode
from tasks.stages.placement import STAGE_FLOW, run_placed_here


def settings_type(stage: str) -> type[Args]:
    """The settings class of ``stage``'s section of the pipeline's config."""
    return PipelineConfig.model_fields[stage].annotation  # type: ignore[return-value]


@flow(name=STAGE_FLOW, log_prints=True, validate_parameters=False)
def gptflow_stage(
    stage: str,
    settings: dict[str, Any],
    context: dict[str, Any],
    inputs: dict[str, dict[str, Any] | None],
    key: str,
    code: str = "",
) -> dict[str, Any]:
    """Run ``stage`` of the run described by ``context`` with ``settings`` on ``inputs``
    here; ``key``/``code``: the cache key and code fingerprint the flow computed."""
    route_library_logs()
    me = str(flow_run.get_id() or f"local-{os.getpid()}")
    ctx = decode(context, "run context").placed_on(me)
    args = settings_type(stage).model_validate(settings)
    ins = decode(inputs, "inputs")
    report = run_placed_here(ctx, stage, args, ins, key=key, code=code)
    return {k: report.get(k) for k in ("stage", "key", "outcome", "host", "worker")}


__all__ = ["gptflow_stage", "settings_type"]
