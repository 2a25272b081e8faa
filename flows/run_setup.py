"""What the pipeline settles when a run starts, before any compute: where its inputs come
from (recorded in ``runs.config``) and, when the judge is required, whether the judge can
run at all — so the nightly fails in seconds, not after hours of training, when Ollama is
down or the model is not pulled."""

from __future__ import annotations

import os

from flows.config import PipelineConfig
from gpt.data.download import MIRROR_ENV
from gpt.errors import JudgeError
from tasks.catalog import Catalog, utcnow


def resolve_mirror(cfg: PipelineConfig, mirror: str | None) -> PipelineConfig:
    """``cfg`` with ``download.mirror`` set to the mirror the run uses: the ``mirror``
    argument, else the config's own, else ``GPTFLOW_MIRROR``, else none (the web)."""
    used = mirror or cfg.download.mirror or os.environ.get(MIRROR_ENV) or None
    if used == cfg.download.mirror:
        return cfg
    return cfg.model_copy(update={"download": cfg.download.model_copy(update={"mirror": used})})


def preflight_required_judge(cat: Catalog, run_id: str, cfg: PipelineConfig) -> None:
    """With ``judge.required`` true, check the Ollama server and the judge model now.
    On failure the run's ``judge`` stage is recorded ``failed`` with the fix and the
    error is raised (the flow fails before downloading or training anything)."""
    if not cfg.judge.required:
        return
    from gpt.eval.judge import preflight

    started = utcnow()
    try:
        preflight(cfg.judge, progress=False)
    except JudgeError as exc:
        msg = (
            f"{exc} — checked when the run started because judge.required is true; nothing "
            "was computed. Fix that, then start the run again (or set judge.required=false "
            "to run without the judge and score later with `gptflow rerun judge`)"
        )
        cat.record_stage(
            run_id, "judge", status="failed", started_at=started, ended_at=utcnow(), message=msg
        )
        raise type(exc)(msg) from None


__all__ = ["preflight_required_judge", "resolve_mirror"]
