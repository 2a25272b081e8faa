"""The stage contract and its runner.

A stage is declared once, in its own module under ``tasks/stages/``::

    class PretrainOut(StageOut):
        checkpoint: str        # paths are relative to the stage folder
        ...

    @stage("pretrain", resumable=True)
    def pretrain_stage(run: StageRun, args: PretrainArgs, tokenize: StageOutput) -> PretrainOut:
        ...

The parameters after ``args`` name the upstream stages whose results it reads (their
typed results are ``tokenize.out``; files are ``tokenize.path(tokenize.out.train_tokens)``).
:func:`run_stage` does everything else the same way for every stage:

1. the key (:class:`tasks.cache.KeyParts`): the stage, its settings
   (:meth:`gpt.config.Args.key_dict`), the content digests of its inputs, the
   fingerprint of the code its module imports, the versions of the third-party packages
   that code imports, and the sha256 of the files it reads from the datasets folder
   (declared by ``@stage(reads=...)``);
2. a verified cache hit is served — after making sure the current catalog holds the
   rows stored in its folder — unless the stage is forced;
3. otherwise one computation per key at a time (:mod:`tasks.lease`): a run that finds
   the key being computed elsewhere waits and then takes that result;
4. the body runs in the work folder (resumed after a crash for resumable stages), its
   rows go to the folder (and, live ones, to the catalog), the folder is committed with
   its manifest and its rows are ingested;
5. ``stages`` rows (and the run record) say what happened: ``completed``, ``cached`` or
   ``failed``, with the reason when a damaged cached result was recomputed, and which
   parts of the key changed since the stage's previous result. The key's parts are kept
   in the manifest and the row's outputs (``key_parts``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpt.config import Args
from gpt.data.download import DownloadArgs
from gpt.errors import GPTFlowError
from tasks.cache import (
    KeyParts,
    StageOutput,
    StageStore,
    Verify,
    key_changes,
    open_stage_store,
    root_child,
)
from tasks.catalog import Catalog, CatalogSettings
from tasks.catalog.values import checkpoint_digest
from tasks.fingerprint import code_fingerprint, package_versions
from tasks.lease import LeaseBase, LeaseInfo
from tasks.rows import RowSink, ensure_ingested, ingest
from tasks.run_state import check_alive, worker_died_reason
from tasks.runlog import RunRecorder

OWNER_FILE = ".owner_run"


def plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays as Python values and NaN/inf as None, nested."""
    import math

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    """What every stage needs to know about the run (small and picklable)."""

    run_id: str
    catalog_settings: CatalogSettings
    """The catalog every stage of the run writes (the pipeline's resolved ``catalog``
    section). Its S3 part is not used: each machine reads its own credentials
    (:meth:`~tasks.catalog.CatalogSettings.with_env_s3`)."""
    artifacts: str
    datasets: str
    mirror: str | None = None
    device: str = "auto"
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

    @property
    def catalog(self) -> Catalog:
        """The run's catalog, with this machine's S3 credentials (for a lake on S3)."""
        return Catalog(settings=self.catalog_settings.with_env_s3())

    @property
    def store(self) -> StageStore:
        return open_stage_store(self.artifacts)

    @property
    def recorder(self) -> RunRecorder:
        return RunRecorder(self.catalog, root_child(self.artifacts, "runs"))


@dataclass
class StageSpec:
    """One stage's declaration (made by :func:`stage`)."""

    name: str
    fn: Callable[..., StageOut]
    module: str
    inputs: tuple[str, ...]
    out_type: type[StageOut]
    resumable: bool = False
    retries: int = 0
    reads: Callable[[RunContext, Any], dict[str, str]] | None = None
    """``reads(ctx, args)``: path -> sha256 of each file the stage reads from the
    datasets folder with these settings (part of its key)."""
    stale: Callable[[Any, Any], str | None] | None = None
    """``stale(args, out)``: why a verified cached result is no longer what the stage
    would compute, for what its key cannot hold (e.g. a judge model pulled anew on the
    server); None when it still is."""


#: Stages declared so far (a stage module registers itself when imported).
REGISTRY: dict[str, StageSpec] = {}


def stage(
    name: str,
    *,
    resumable: bool = False,
    retries: int = 0,
    reads: Callable[[RunContext, Any], dict[str, str]] | None = None,
    stale: Callable[[Any, Any], str | None] | None = None,
) -> Callable:
    """Declare the decorated function as stage ``name`` (see the module docstring).
    ``reads``: the files it reads from the datasets folder; ``stale``: why a cached
    result is out of date (see :class:`StageSpec`)."""

    def deco(fn: Callable[..., StageOut]) -> Callable[..., StageOut]:
        sig = inspect.signature(fn, eval_str=True)
        params = list(sig.parameters)
        out_type = sig.return_annotation
        if len(params) < 2 or not (isinstance(out_type, type) and issubclass(out_type, StageOut)):
            raise TypeError(f"stage {name}: need fn(run, args, *inputs) -> StageOut subclass")
        REGISTRY[name] = StageSpec(
            name=name,
            fn=fn,
            module=fn.__module__,
            inputs=tuple(params[2:]),
            out_type=out_type,
            resumable=resumable,
            retries=retries,
            reads=reads,
            stale=stale,
        )
        return fn

    return deco


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task/flow run, else the module logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run (the body called directly in tests)
        return logging.getLogger("gptflow.stages")


def now() -> datetime:
    return datetime.now(UTC)


def finite(value: float | None) -> float | None:
    """``value``, or None when it is missing or not a finite number (JSON has no NaN)."""
    import math

    return float(value) if value is not None and math.isfinite(value) else None


def _in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (where an artifact has a run to belong to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A Prefect progress artifact advanced by a training loop (a no-op outside runs)."""

    #: Markers short of 100 %: a stage that stops settles them (:meth:`settle_open`).
    _open: ClassVar[list[Progress]] = []

    def __init__(self, key: str, total: int | None) -> None:
        self.key = key
        self.total = total
        self.percent = 0.0
        self.id = None
        if not _in_prefect_run():
            # outside a flow/task run Prefect would start a temporary server just for this
            return
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(progress=0.0, key=key, description=key)
        except Exception:
            self.id = None
        if self.id is not None:
            Progress._open.append(self)

    def update(self, done: int) -> None:
        if self.id is None or not self.total:
            return
        self.percent = min(100.0, 100.0 * done / self.total)
        if self.percent >= 100.0 and self in Progress._open:
            Progress._open.remove(self)
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=self.percent)
        except Exception:
            pass

    @classmethod
    def settle_open(cls, reason: str) -> None:
        """Mark every marker left part-way as stopped there, and why (the bar keeps
        showing how far its stage got; the description says it is not going on)."""
        from prefect.artifacts import update_progress_artifact

        while cls._open:
            bar = cls._open.pop()
            with contextlib.suppress(Exception):
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
    published: str | None = None
    """The folder's URL when the artifacts root is an object store (``final`` is then
    its local copy)."""
    files: dict[str, str] = field(default_factory=dict)
    """The datasets files in the key (path -> sha256): what the body must read."""

    @property
    def device(self) -> str:
        return self.ctx.device

    @property
    def progress(self) -> bool:
        return self.ctx.progress

    def log(self) -> logging.Logger | logging.LoggerAdapter:
        return logger()

    def metrics_sink(self, progress: Progress | None = None) -> Callable[[list[dict]], None]:
        """An ``on_metrics`` callback: rows go to the folder and, live, to the catalog."""

        def sink(rows: list[dict[str, Any]]) -> None:
            check_alive()  # the worker died: stop at this step (resumable from a checkpoint)
            if not rows:
                return
            t = now()
            self.rows.add(
                "metrics",
                [{"time": t, **r, "run_id": self.producer, "stage": self.stage} for r in rows],
                live=True,
            )
            if progress is not None:
                progress.update(max(int(r.get("step") or 0) for r in rows))

        return sink

    def sample_sink(self) -> Callable[[dict[str, Any]], None]:
        """An ``on_sample`` callback (samples are logged too)."""

        def sink(sample: dict[str, Any]) -> None:
            self.rows.add(
                "samples",
                [
                    {
                        "run_id": self.producer,
                        "stage": self.stage,
                        "epoch": sample.get("epoch"),
                        "step": sample.get("step"),
                        "prompt": sample.get("prompt"),
                        "text": sample.get("text"),
                        "time": now(),
                    }
                ],
                live=True,
            )
            logger().info(
                "%s sample (epoch %s): %r", self.stage, sample.get("epoch"), sample.get("text")
            )

        return sink

    def record_checkpoint(self, rel: str) -> None:
        """A ``checkpoints`` row for the checkpoint folder ``rel`` of this stage."""
        import json

        folder = self.work / rel
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
        sha, size = checkpoint_digest(folder)
        self.rows.add(
            "checkpoints",
            [
                {
                    "run_id": self.producer,
                    "stage": self.stage,
                    "path": f"{self.published}/{rel}" if self.published else str(self.final / rel),
                    "sha256": sha,
                    "bytes": size,
                    "config": cfg,
                    "created_at": now(),
                }
            ],
        )


def _output(manifest: dict[str, Any], spec: StageSpec, folder: Path, hit: bool) -> StageOutput:
    return StageOutput(
        stage=spec.name,
        key=manifest["key"],
        root=str(folder),
        run_id=manifest["producer_run_id"],
        digest=manifest["digest"],
        out=spec.out_type.model_validate({**manifest["out"], **(manifest.get("measured") or {})}),
        files=manifest["files"],
        cache_hit=hit,
        created_at=float(manifest.get("created_at") or 0.0),
    )


def committed_output(
    ctx: RunContext, name: str, key: str, *, cache_hit: bool = False
) -> tuple[StageOutput | None, str | None]:
    """The committed, verified result of stage ``name`` under ``key`` as downstream
    stages see it; ``(None, reason)`` when there is none (reason None) or it is damaged."""
    spec = load_spec(name)
    manifest, reason = ctx.store.lookup(name, key, ctx.verify)
    if manifest is None:
        return None, reason
    return _output(manifest, spec, ctx.store.final_dir(name, key), hit=cache_hit), None


def _stage_outputs(result: StageOutput, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the ``stages`` row's ``outputs`` holds."""
    return {
        "key": result.key,
        "root": result.root,
        "producer_run_id": result.run_id,
        "digest": result.digest,
        "device": manifest.get("device"),
        "wall_s": manifest.get("wall_s"),
        "key_parts": manifest.get("key_parts"),
        **result.data,
    }


def load_spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (importing ``tasks.stages.<name>``)."""
    if name not in REGISTRY:
        import importlib

        importlib.import_module(f"tasks.stages.{name}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise GPTFlowError(f"tasks.stages.{name} declares no stage {name!r}") from None


def key_parts(
    spec: StageSpec,
    args: Args,
    inputs: dict[str, StageOutput | None],
    ctx: RunContext | None = None,
) -> KeyParts:
    """Everything the key of running ``spec`` with ``args`` on ``inputs`` hashes. A stage
    that reads files from the datasets folder needs ``ctx`` (where they are)."""
    files: dict[str, str] = {}
    if spec.reads is not None:
        if ctx is None:
            raise TypeError(f"the key of stage {spec.name} needs the run's context")
        files = dict(sorted(spec.reads(ctx, args).items()))
    return KeyParts(
        stage=spec.name,
        settings=args.key_dict(),
        inputs={k: (v.digest if v is not None else None) for k, v in sorted(inputs.items())},
        code=code_fingerprint(spec.module),
        packages=package_versions(spec.module),
        files=files,
    )


def key_for(
    spec: StageSpec,
    args: Args,
    inputs: dict[str, StageOutput | None],
    ctx: RunContext | None = None,
) -> str:
    """The cache key of running ``spec`` with ``args`` on ``inputs`` (:func:`key_parts`)."""
    return key_parts(spec, args, inputs, ctx).key


def why_recomputed(ctx: RunContext, name: str, parts: KeyParts) -> str | None:
    """Which parts of the key changed since the stage's previous result in the catalog
    (another run's), in words; None when there is none to compare with."""
    try:
        df = ctx.catalog.query_df(
            "SELECT run_id, outputs FROM stages WHERE stage = ? AND run_id <> ? "
            "AND status IN ('completed', 'cached') "
            "AND json_extract(outputs, '$.key_parts') IS NOT NULL "
            "ORDER BY ended_at DESC LIMIT 1",
            [name, ctx.run_id],
        )
    except GPTFlowError:
        return None
    if df.empty:
        return None
    import json

    outputs = df["outputs"].iloc[0]
    outputs = json.loads(outputs) if isinstance(outputs, str) else outputs
    if outputs.get("key") == parts.key:
        return None
    changed = key_changes(outputs["key_parts"], parts.summary())
    if not changed:
        return None
    return f"recomputed: {'; '.join(changed)} changed since run {df['run_id'].iloc[0]}"


def _cpu_threads() -> int:
    import torch

    return torch.get_num_threads()


def _device_name(setting: str) -> str:
    from gpt.device import resolve_device

    try:
        return str(resolve_device(setting))
    except GPTFlowError:
        return setting


def _ensure_producer_run(ctx: RunContext, producer: str) -> None:
    """Put the producing run's ``runs`` row into this catalog when it lacks it."""
    if producer == ctx.run_id:
        return
    cat = ctx.catalog
    have = cat.query_df("SELECT count(*) AS n FROM runs WHERE run_id = ?", [producer]).n.iloc[0]
    if have:
        return
    rec = ctx.recorder.read(producer)
    if rec and rec.get("run"):
        from tasks.runlog import typed_row

        cat.upsert_rows("runs", [typed_row(rec["run"])], key=["run_id"])


def run_stage(
    ctx: RunContext,
    name: str,
    args: Args,
    *,
    cached_only: bool = False,
    **inputs: StageOutput | None,
) -> StageOutput | None:
    """Serve stage ``name`` from its verified folder or compute it (module docstring).
    With ``cached_only``, serve a cache hit or return None (nothing is computed)."""
    spec = load_spec(name)
    missing = [i for i in spec.inputs if i not in inputs]
    if missing:
        raise TypeError(f"stage {name} needs inputs {missing}")
    log = logger()
    rec = ctx.recorder
    store = ctx.store
    started = now()
    try:
        parts = key_parts(spec, args, inputs, ctx)
    except BaseException as exc:  # e.g. an input file refused by its trust record
        message = f"{type(exc).__name__}: {exc}"[:4000]
        rec.record_stage(ctx.run_id, name, status="failed", started_at=started, message=message)
        raise
    key = parts.key
    forced = name in ctx.force

    def serve(manifest: dict[str, Any]) -> StageOutput:
        folder = store.final_dir(name, key)
        result = _output(manifest, spec, folder, hit=True)
        ingested = ensure_ingested(ctx.catalog, folder, manifest.get("rows") or {})
        _ensure_producer_run(ctx, result.run_id)
        msg = None
        if ingested:
            msg = f"rows of tables {', '.join(ingested)} ingested from the stage folder"
            log.info("%s: %s", name, msg)
        rec.record_stage(
            ctx.run_id,
            name,
            status="cached",
            started_at=started,
            cache_hit=True,
            outputs=_stage_outputs(result, manifest),
            message=msg,
        )
        log.info("%s: cache hit (key %s, computed by run %s)", name, key, result.run_id)
        return result

    def refusal(manifest: dict[str, Any]) -> str | None:
        """Why the stage's own check refuses a verified result (None: serve it)."""
        if spec.stale is None:
            return None
        return spec.stale(args, spec.out_type.model_validate(manifest["out"]))

    reason = None
    if not forced:
        manifest, reason = store.lookup(name, key, ctx.verify)
        if manifest is not None:
            reason = refusal(manifest)
            if reason is None:
                return serve(manifest)
        if reason:
            log.warning("%s: cached result not usable (%s); recomputing", name, reason)
    if cached_only:
        return None

    lease = store.lease(name, key, ctx.run_id)

    def waiting(info: LeaseInfo) -> None:
        log.info("%s: key %s is being computed by %s; waiting for it", name, key, info.describe())
        rec.record_stage(
            ctx.run_id,
            name,
            status="waiting",
            started_at=started,
            message=f"waiting for {info.describe()}",
        )

    waited = lease.acquire(on_wait=waiting)
    try:
        if waited and not forced:
            manifest, reason2 = store.lookup(name, key, ctx.verify)
            if manifest is not None:
                reason2 = refusal(manifest)
                if reason2 is None:
                    return serve(manifest)
            reason = reason2 or reason
        return _compute(ctx, spec, args, inputs, parts, lease, started, forced, reason)
    finally:
        lease.release()


def _compute(
    ctx: RunContext,
    spec: StageSpec,
    args: Args,
    inputs: dict[str, StageOutput | None],
    parts: KeyParts,
    lease: LeaseBase,
    started: datetime,
    forced: bool,
    reason: str | None,
) -> StageOutput:
    log = logger()
    rec = ctx.recorder
    store = ctx.store
    name = spec.name
    key = parts.key
    changed = None if forced else why_recomputed(ctx, name, parts)
    rec.record_stage(ctx.run_id, name, status="running", started_at=started, cache_hit=False)
    log.info("%s: computing (key %s)", name, key)
    t0 = time.perf_counter()
    try:
        work = store.fresh_work_dir(name, key, lease, resume=spec.resumable and not forced)
        owner = work / OWNER_FILE
        producer = (owner.read_text().strip() if owner.exists() else "") or ctx.run_id
        if producer != ctx.run_id:
            log.info("%s: resuming the attempt of run %s", name, producer)
        owner.write_text(producer)
        run = StageRun(
            ctx=ctx,
            stage=name,
            key=key,
            work=work,
            final=store.final_dir(name, key),
            producer=producer,
            rows=RowSink(work, ctx.catalog),
            published=store.published(name, key),
            files=parts.files,
        )
        try:
            out = spec.fn(run, args, **{i: inputs[i] for i in spec.inputs})
        except StageSkipped as skip:
            rec.record_stage(
                ctx.run_id, name, status="skipped", started_at=started, message=str(skip)
            )
            raise
        except StageIncomplete as part:
            result = StageOutput(stage=name, key=key, root=str(work), run_id=producer, out=part.out)
            rec.record_stage(
                ctx.run_id,
                name,
                status="completed",
                started_at=started,
                cache_hit=False,
                outputs={"key": key, "producer_run_id": producer, **result.data},
                message=str(part),
            )
            return result
        if not isinstance(out, spec.out_type):
            raise TypeError(f"stage {name} returned {type(out).__name__}, not {spec.out_type}")
        content, timed = out.split_measured()
        rows_meta = run.rows.write_parquet()
        # rows reach the catalog before the folder is committed: a failed ingestion fails
        # the stage and leaves nothing in the cache
        ingest(ctx.catalog, work, rows_meta)
        manifest = store.commit(
            name,
            key,
            {
                "producer_run_id": producer,
                "out": content,
                "measured": timed,
                "args": args.key_dict(),  # what shaped the result
                "run_args": args.to_dict(),  # and how it ran (operational fields too)
                "inputs": {
                    k: None if v is None else {"key": v.key, "digest": v.digest, "run_id": v.run_id}
                    for k, v in sorted(inputs.items())
                },
                "code": parts.code,
                "key_parts": parts.summary(),
                "rows": rows_meta,
                "device": _device_name(ctx.device),
                # CPU results depend on it in the last bits (reductions split by thread)
                "cpu_threads": _cpu_threads(),
                "wall_s": round(time.perf_counter() - t0, 3),
                "resumed_by_run_id": ctx.run_id if producer != ctx.run_id else None,
            },
            lease,
        )
        result = _output(manifest, spec, store.final_dir(name, key), hit=False)
    except StageSkipped:
        raise
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"[:4000]
        rec.record_stage(
            ctx.run_id, name, status="failed", started_at=started, cache_hit=False, message=message
        )
        Progress.settle_open(worker_died_reason() or message)
        raise
    notes = list(run.notes)
    if reason:
        notes.insert(0, f"recomputed: the cached result was not usable ({reason})")
    elif changed:
        notes.insert(0, changed)
    rec.record_stage(
        ctx.run_id,
        name,
        status="completed",
        started_at=started,
        cache_hit=False,
        outputs=_stage_outputs(result, manifest),
        message="; ".join(notes) or None,
    )
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)
    return result
