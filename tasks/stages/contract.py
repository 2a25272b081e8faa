"""What a stage body gets and gives.

A stage module declares, in order, its typed result (a :class:`StageOut`), and its body
``fn(run: StageRun, args: <its settings>, <upstream stage>: StageOutput, …) -> <its
result>``, registered with :func:`tasks.stages.runner.stage`. The body reads its inputs'
typed results (``tokenize.out``; files by ``tokenize.path(tokenize.out.train_tokens)``),
makes one call into its library recipe, adds its catalog rows (``run.add_rows``) and
returns its result, whose paths are relative to its folder. Everything around it — the
key, the cache, the lease, the records — is the runner's (:mod:`tasks.stages.runner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpt.data.download import DownloadArgs
from gpt.errors import GPTFlowError
from gpt.paths import is_remote
from tasks.catalog import Catalog, CatalogSettings, checkpoint_digest, utcnow
from tasks.jsonable import plain
from tasks.records.rows import SCOPES, RowSink
from tasks.records.run_state import check_alive
from tasks.records.runs import RunRecorder, placed_records_dir
from tasks.run_logger import run_logger
from tasks.store.folder import StageStore
from tasks.store.manifest import Verify
from tasks.store.roots import open_stage_store, root_child


def measured(**kwargs: Any) -> Any:
    """Declare a result field that says how one computation went — a duration, a speed,
    the step a resumed run started from — rather than what it produced. Such fields are
    kept in the stage folder's record (``produced.json``), not in its manifest, so two
    computations of one key write the same manifest; downstream stages and the report
    still read them on the typed result."""
    return Field(json_schema_extra={"measured": True}, **kwargs)


class StageOut(BaseModel):
    """Base of a stage's typed result: small, JSON-able; paths relative to its folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        return plain(data) if isinstance(data, dict) else data

    @classmethod
    def from_result(cls, result: Any, **fields: Any) -> Self:
        """The stage's result from its recipe's ``result`` (a mapping, or an object with
        attributes): each field of this type taken from it by name, ``fields`` given
        here winning (e.g. a checkpoint path made relative to the stage folder)."""

        def get(name: str) -> Any:
            return result[name] if isinstance(result, Mapping) else getattr(result, name)

        def has(name: str) -> bool:
            return name in result if isinstance(result, Mapping) else hasattr(result, name)

        taken = {n: get(n) for n in cls.model_fields if n not in fields and has(n)}
        return cls.model_validate({**taken, **fields})

    @classmethod
    def measured_fields(cls) -> frozenset[str]:
        """The fields declared with :func:`measured`."""
        return frozenset(
            name
            for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("measured")
        )

    def split_measured(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(content, measured)``: the result as JSON without and with only the
        :func:`measured` fields."""
        data = self.model_dump(mode="json")
        timed = self.measured_fields()
        return (
            {k: v for k, v in data.items() if k not in timed},
            {k: v for k, v in data.items() if k in timed},
        )


@dataclass
class StageOutput:
    """A finished stage as downstream stages see it: where its folder is, who produced
    it, the digest of its content, and its typed result (``out``; ``data`` is the same
    as a plain dict). Paths in ``out`` are relative to ``root``: use :meth:`path`."""

    stage: str
    key: str
    root: str
    run_id: str
    """The run that computed this result (its catalog rows are stored under it)."""
    digest: str = ""
    out: Any = None
    cache_hit: bool = False

    def path(self, rel: str) -> Path:
        """Absolute path of a file or folder of this stage."""
        return Path(self.root) / rel

    @property
    def data(self) -> dict[str, Any]:
        """The typed result as a plain JSON-able dict."""
        if self.out is None:
            return {}
        if hasattr(self.out, "model_dump"):
            return self.out.model_dump(mode="json")
        return dict(self.out)


class StageSkipped(GPTFlowError):
    """Raised by a body that cannot run and need not (recorded ``skipped``, flow goes on)."""


class StageIncomplete(GPTFlowError):
    """Raised by a body whose result is usable but not complete (e.g. some judge requests
    failed): recorded ``completed`` with the message, not committed to the cache, so a
    rerun continues it."""

    def __init__(self, out: StageOut, message: str) -> None:
        super().__init__(message)
        self.out = out


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to know about the run (small, picklable, and JSON through
    :mod:`gpt.distributed.codec` for a stage placed on another machine)."""

    run_id: str
    catalog_settings: CatalogSettings
    """The catalog every stage of the run writes (the pipeline's resolved ``catalog``
    section). Its S3 part is not used: each machine reads its own credentials
    (:meth:`~tasks.catalog.CatalogSettings.with_env_s3`)."""
    artifacts: str
    datasets: str
    mirror: str | None = None
    device: str = "auto"
    """The device setting; each stage resolves it where it runs (:attr:`StageRun.device`)."""
    force: tuple[str, ...] = ()
    verify: Verify = "auto"
    progress: bool = True
    download: DownloadArgs | None = None
    """How stages fetch files (retries, timeouts); None = the defaults."""
    judge: dict[str, Any] | None = None
    """The run's judge settings (``JudgeConfig`` as a dict), for stages that consult the
    judge besides the judge stage (the int8 check of extract_responses); None = none."""
    retrust: tuple[str, ...] = ()
    """Sources or files (``--retrust NAME``) whose trust-on-first-use files are fetched
    again and accepted with a new digest (:mod:`gpt.data.trust`)."""
    placed_flow_run: str | None = None
    """The flow run of a stage placed on a work pool (:mod:`tasks.stages.placement`):
    this run's record is then written in that flow run's own folder, the run's record
    file keeping one writer, the flow."""

    @property
    def catalog(self) -> Catalog:
        """The run's catalog, with this machine's S3 credentials (for a lake on S3)."""
        return Catalog(settings=self.catalog_settings.with_env_s3())

    @property
    def store(self) -> StageStore:
        return open_stage_store(self.artifacts)

    @property
    def recorder(self) -> RunRecorder:
        runs = root_child(self.artifacts, "runs")
        if self.placed_flow_run and not is_remote(self.artifacts):
            own = Path(placed_records_dir(self.artifacts, self.placed_flow_run))
            return RunRecorder(self.catalog, runs, placed=(self.run_id, own))
        return RunRecorder(self.catalog, runs)  # an object store: records updated by CAS

    def placed_on(self, flow_run_id: str) -> RunContext:
        """This context as the placed stage's flow run ``flow_run_id`` sees it."""
        return dataclasses.replace(self, placed_flow_run=flow_run_id)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (Prefect's inside a run)."""
    return run_logger("gptflow.stages")


def _in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (where an artifact has a run to belong to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class ProgressArtifact:
    """A Prefect progress artifact that follows a training loop's steps (a no-op outside
    a Prefect run). Created at its first update; advanced when the whole percentage
    changes, so a long loop makes at most about a hundred calls."""

    #: Bars short of 100 %: a stage that stops settles them (:meth:`settle_open`).
    _open: ClassVar[list[ProgressArtifact]] = []

    def __init__(self, key: str) -> None:
        self.key = key
        self.percent = 0.0
        self.id: Any = None
        self._live = _in_prefect_run()  # else Prefect would start a temporary server

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` steps."""
        if not self._live or total <= 0:
            return
        percent = min(100.0, 100.0 * done / total)
        if self.id is not None and int(percent) == int(self.percent):
            return
        self.percent = percent
        with contextlib.suppress(Exception):
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.id is None:
                self.id = create_progress_artifact(
                    progress=percent, key=self.key, description=self.key
                )
                ProgressArtifact._open.append(self)
            else:
                update_progress_artifact(self.id, progress=percent)
        if percent >= 100.0 and self in ProgressArtifact._open:
            ProgressArtifact._open.remove(self)

    @classmethod
    def settle_open(cls, reason: str) -> None:
        """Mark every bar left part-way as stopped there, and why (the bar keeps showing
        how far its stage got; the description says it is not going on)."""
        while cls._open:
            bar = cls._open.pop()
            with contextlib.suppress(Exception):
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(
                    bar.id,
                    progress=bar.percent,
                    description=f"{bar.key}: stopped at {bar.percent:.0f}% — {reason}"[:2000],
                )


@dataclass
class StageRun:
    """What a stage body gets besides its settings and inputs."""

    ctx: RunContext
    stage: str
    key: str
    work: Path
    """The folder to write into (becomes the stage folder on commit)."""
    final: Path
    """Where the folder will be once committed (for rows that name final paths)."""
    producer: str
    """The run the rows belong to (the run that started this computation)."""
    rows: RowSink
    notes: list[str] = field(default_factory=list)
    """Remarks the stage's ``stages`` row carries."""
    published: str | None = None
    """The folder's URL when the artifacts root is an object store (``final`` is then
    its local copy)."""
    files: dict[str, str] = field(default_factory=dict)
    """The datasets files in the key (path -> sha256): what the body must read."""
    reused: bool = False
    """Set by a stage kept outside the store (download) when everything it makes was
    already there: recorded ``cached``."""

    @functools.cached_property
    def device(self) -> str:
        """The device this stage computes on: the run's setting, resolved once where the
        stage runs, when it first asks (``cpu``, ``cuda``, ``cuda:1``, ``mps``; the
        setting itself when it names no device here — the library then says why). Lazy: resolving imports
        torch, which a stage that computes on no device (download, judge) never needs."""
        from gpt.device import resolve_device

        try:
            return str(resolve_device(self.ctx.device))
        except GPTFlowError:
            return self.ctx.device

    @property
    def progress(self) -> bool:
        """Whether to show progress bars."""
        return self.ctx.progress

    @property
    def forced(self) -> bool:
        """Whether the run recomputes this stage (``--force``)."""
        return self.stage in self.ctx.force

    def add_rows(
        self, table: str, rows: Iterable[Mapping[str, Any]], *, live: bool = False
    ) -> None:
        """Add ``rows`` to ``table`` (:meth:`RowSink.add`), each stamped with the columns
        of the table's scope that name this computation: ``run_id`` (the producing run)
        and ``stage``."""
        ids = {"run_id": self.producer, "stage": self.stage}
        stamp = {c: ids[c] for c in SCOPES[table] if c in ids}
        self.rows.add(table, [{**r, **stamp} for r in rows], live=live)

    def metrics_sink(self) -> Callable[[list[dict]], None]:
        """An ``on_metrics`` callback: rows go to the folder and, live, to the catalog."""

        def sink(rows: list[dict[str, Any]]) -> None:
            check_alive()  # the worker died: stop at this step (resumable from a checkpoint)
            if rows:
                t = utcnow()
                self.add_rows("metrics", [{"time": t, **r} for r in rows], live=True)

        return sink

    def progress_sink(self) -> Callable[[int, int], None]:
        """An ``on_progress(done, total)`` callback: the stage's progress artifact
        (``<stage>-progress`` in the UI)."""
        return ProgressArtifact(f"{self.stage.replace('_', '-')}-progress").update

    def sample_sink(self) -> Callable[[dict[str, Any]], None]:
        """An ``on_sample`` callback (samples are logged too)."""

        def sink(sample: dict[str, Any]) -> None:
            row = {k: sample.get(k) for k in ("epoch", "step", "prompt", "text")}
            self.add_rows("samples", [{**row, "time": utcnow()}], live=True)
            logger().info("%s sample (epoch %s): %r", self.stage, row["epoch"], row["text"])

        return sink

    def relative(self, path: str | Path) -> str:
        """``path`` (written under the work folder) relative to it, as a result holds it."""
        return Path(path).resolve().relative_to(self.work.resolve()).as_posix()

    def checkpoint(self, path: str | Path) -> str:
        """Record the checkpoint folder ``path`` (under the work folder) in
        ``checkpoints`` and return it relative to the work folder."""
        rel = self.relative(path)
        folder = self.work / rel
        cfg_path = folder / "config.json"
        sha, size = checkpoint_digest(folder)
        self.add_rows(
            "checkpoints",
            [
                {
                    "path": f"{self.published}/{rel}" if self.published else str(self.final / rel),
                    "sha256": sha,
                    "bytes": size,
                    "config": json.loads(cfg_path.read_text()) if cfg_path.exists() else None,
                    "created_at": utcnow(),
                }
            ],
        )
        return rel
