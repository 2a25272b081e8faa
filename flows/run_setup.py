"""What the pipeline checks when a run starts, before any compute: when the judge is
required, whether it can run at all — so the nightly fails in seconds, not after hours of
training, when Ollama is down or the model is not pulled."""

from __future__ import annotations

from flows.config import PipelineConfig
from gpt.errors import JudgeError
from tasks.catalog import utcnow
from tasks.runlog import RunRecorder


def preflight_required_judge(rec: RunRecorder, run_id: str, cfg: PipelineConfig) -> None:
    """With ``judge.required`` true, check the Ollama server and the judge model now.
    On failure the run's ``judge`` stage is recorded ``failed`` with the fix and the
    error is raised (the flow fails before downloading or training anything)."""
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
        rec.record_stage(
            run_id, "judge", status="failed", started_at=started, ended_at=utcnow(), message=msg
        )
        raise type(exc)(msg) from None


__all__ = ["preflight_required_judge"]
