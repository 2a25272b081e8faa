"""How a recorded run starts and ends: one way for the pipeline flow, the judge flow and
``gptflow judge``.

A run is recorded ``running`` for the span of its work (a heartbeat beats; the process
that started it is watched), then ``completed``, or ``failed`` / ``crashed`` with the
reason (:meth:`~tasks.records.runs.RunRecorder.running`). In a flow run the run id is the flow
run's: settings that fail once the flow run started still leave a ``failed`` run with
the reason, so it shows in ``gptflow runs``, and a run whose worker died ends the flow
run Crashed, saying so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from flows.config import PipelineConfig, config_to_dict
from flows.run_logs import route_library_logs
from gpt.errors import ConfigError, GPTFlowError
from gpt.paths import artifacts_root, datasets_dir, project_root
from tasks.stages import STAGES
from tasks.stages.contract import RunContext

if TYPE_CHECKING:
    from prefect.states import State

T = TypeVar("T")


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has local changes), if any."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=10
        )

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty else "")


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
    """The run's context: where its catalog, artifacts and inputs are, and how to run.
    An unknown ``force`` stage or ``retrust`` name is an error here, before any work."""
    from gpt.data.trust import retrust_paths

    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: no such stage; stages: {', '.join(STAGES)}")
    retrust_paths(retrust)
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


@contextlib.contextmanager
def recorded_run(
    ctx: RunContext,
    *,
    profile: str | None,
    config: dict[str, Any] | None,
    flow_run_id: str | None = None,
) -> Iterator[None]:
    """The ``with`` block is run ``ctx.run_id``: recorded ``running`` (with its config
    and the checkout's revision), heartbeat and all, then ``completed``, or ``failed`` /
    ``crashed`` with the reason when the block raises."""
    with ctx.recorder.running(
        ctx.run_id,
        flow_run_id=flow_run_id,
        profile=profile,
        config=config,
        git_rev=git_revision(),
    ):
        yield


@dataclass(frozen=True)
class FlowRun:
    """The recorded run of the current Prefect flow run: its settings and context."""

    cfg: PipelineConfig
    ctx: RunContext

    @classmethod
    def start(cls, profile: str, build: Callable[[], PipelineConfig], **context: Any) -> FlowRun:
        """Send the library's log lines to this flow run, build its settings (``build``)
        and context (:func:`make_context` with ``context``), and record the mirror the
        inputs come from in the settings. Settings that fail here are recorded as a
        ``failed`` run under the flow run's id (with the reason), then raised."""
        from prefect.runtime import flow_run

        route_library_logs()  # library INFO lines reach this run's logs (also for workers)
        run_id = str(flow_run.get_id() or os.urandom(8).hex())
        try:
            cfg = build()
            ctx = make_context(cfg, run_id, **context)
        except GPTFlowError as exc:
            record_failed_start(run_id, profile, exc)
            raise
        return cls(cfg.replace(download=cfg.download.replace(mirror=ctx.mirror)), ctx)

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    def record(self, work: Callable[[], T]) -> T | State:
        """``work()`` as the recorded run (:func:`recorded_run`); its result, or a
        Crashed state saying why when the worker that started the run died (the flow
        returns it, so the flow run ends Crashed)."""
        try:
            with recorded_run(
                self.ctx,
                profile=self.cfg.profile,
                config=config_to_dict(self.cfg),
                flow_run_id=self.run_id,
            ):
                return work()
        except BaseException as exc:
            return crashed_state(exc)


def record_failed_start(run_id: str, profile: str | None, exc: BaseException) -> None:
    """Record a flow run whose settings failed before its run could start as a ``failed``
    run (in the catalog and artifacts the environment selects), so that it shows in
    ``gptflow runs`` with the reason. Best effort: a broken catalog setting is logged."""
    from prefect import get_run_logger

    from tasks.catalog import Catalog
    from tasks.records.runs import RunRecorder
    from tasks.store.roots import root_child

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
    from prefect.states import Crashed

    from tasks.records.run_state import worker_died_reason

    died = worker_died_reason()
    if died is None:
        raise exc
    return Crashed(message=died)
