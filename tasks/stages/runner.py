"""The stage runner: every stage is served from its verified folder or computed, the
same way.

A stage module registers its body with :func:`stage`; :func:`run_stage` does the rest:

1. the key (:class:`tasks.store.keys.KeyParts`): the stage, its settings
   (:meth:`gpt.config.Args.key_dict`), the content digests of its inputs, the
   fingerprint of the code its module imports — this runner included, since it shapes
   the folder —, the versions of the third-party packages that code imports, and the
   sha256 of the files it reads from the datasets folder (``@stage(reads=...)``);
2. a verified cache hit is served — after making sure the current catalog holds the
   rows stored in its folder — unless the stage is forced;
3. otherwise one computation per key at a time (:mod:`tasks.store.lease`): a run that
   finds the key being computed elsewhere waits and then takes that result;
4. the body runs in the work folder (resumed after a crash for resumable stages), its
   rows go to the folder (and, live ones, to the catalog), the folder is committed with
   its manifest and its rows are ingested;
5. one :class:`~tasks.records.runs.StageRecord` per event says what happened —
   ``running``, ``waiting``, ``cached``, ``completed``, ``skipped`` or ``failed`` — with
   the reason when a damaged cached result was recomputed, and which parts of the key
   changed since the stage's previous result (``key_parts`` in the manifest and the
   row's outputs).

A stage kept outside the store (``@stage(kept=False)``: download, whose files live in the
datasets folder and are checked by the downloader) runs its body every time; its digest
is that of its typed result, so downstream keys follow the bytes it reports.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config import Args
from gpt.errors import GPTFlowError
from tasks.catalog import utcnow
from tasks.records.rows import RowSink, ensure_ingested, ingest
from tasks.records.run_state import worker_died_reason
from tasks.records.runs import StageRecord, typed_row
from tasks.stages.contract import (
    ProgressArtifact,
    RunContext,
    StageIncomplete,
    StageOut,
    StageOutput,
    StageRun,
    StageSkipped,
    logger,
)
from tasks.store.fingerprint import code_fingerprint, package_versions
from tasks.store.keys import KeyParts, key_changes
from tasks.store.lease import LeaseBase, LeaseInfo
from tasks.store.manifest import content_digest

OWNER_FILE = ".owner_run"


@dataclass(frozen=True)
class StageSpec:
    """One stage's declaration (made by :func:`stage` from the body's signature)."""

    name: str
    fn: Callable[..., StageOut]
    module: str
    args_type: type[Args]
    """The settings type (the body's second parameter)."""
    inputs: tuple[str, ...]
    """The upstream stages it reads (the body's parameters after the settings)."""
    out_type: type[StageOut]
    resumable: bool = False
    retries: int = 0
    kept: bool = True
    """False for a stage whose result is not a stage folder (download)."""
    reads: Callable[[RunContext, Any], dict[str, str]] | None = None
    """``reads(ctx, args)``: path -> sha256 of each file the stage reads from the
    datasets folder with these settings (part of its key)."""
    stale: Callable[[Any, Any], str | None] | None = None
    """``stale(args, out)``: why a verified cached result is no longer what the stage
    would compute, for what its key cannot hold (e.g. a judge model pulled anew on the
    server); None when it still is."""


#: Stages declared so far (a stage module registers itself when imported).
REGISTRY: dict[str, StageSpec] = {}


def stage(name: str, **options: Any) -> Callable:
    """Declare the decorated body as stage ``name``; ``options`` are the other fields of
    its :class:`StageSpec` (``resumable``, ``retries``, ``kept``, ``reads``, ``stale``)."""

    def deco(fn: Callable[..., StageOut]) -> Callable[..., StageOut]:
        sig = inspect.signature(fn, eval_str=True)
        params = list(sig.parameters.values())
        out_type = sig.return_annotation
        if len(params) < 2 or not (isinstance(out_type, type) and issubclass(out_type, StageOut)):
            raise TypeError(f"stage {name}: need fn(run, args, *inputs) -> StageOut subclass")
        REGISTRY[name] = StageSpec(
            name=name,
            fn=fn,
            module=fn.__module__,
            args_type=params[1].annotation,
            inputs=tuple(p.name for p in params[2:]),
            out_type=out_type,
            **options,
        )
        return fn

    return deco


def load_spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (importing ``tasks.stages.<name>``)."""
    if name not in REGISTRY:
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


def _output(manifest: dict[str, Any], spec: StageSpec, folder: Path, hit: bool) -> StageOutput:
    return StageOutput(
        stage=spec.name,
        key=manifest["key"],
        root=str(folder),
        run_id=manifest["producer_run_id"],
        digest=manifest["digest"],
        out=spec.out_type.model_validate({**manifest["out"], **(manifest.get("measured") or {})}),
        cache_hit=hit,
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


def _row_outputs(result: StageOutput, manifest: dict[str, Any]) -> dict[str, Any]:
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
    outputs = df["outputs"].iloc[0]
    outputs = json.loads(outputs) if isinstance(outputs, str) else outputs
    if outputs.get("key") == parts.key:
        return None
    changed = key_changes(outputs["key_parts"], parts.summary())
    if not changed:
        return None
    return f"recomputed: {'; '.join(changed)} changed since run {df['run_id'].iloc[0]}"


def _ensure_producer_run(ctx: RunContext, producer: str) -> None:
    """Put the producing run's ``runs`` row into this catalog when it lacks it."""
    if producer == ctx.run_id:
        return
    cat = ctx.catalog
    if cat.query_rows("SELECT 1 FROM runs WHERE run_id = ?", [producer]):
        return
    rec = ctx.recorder.read(producer)
    if rec and rec.get("run"):
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
    With ``cached_only``, serve a cache hit or return None (nothing is computed).

    The body is called from here, with the settings object as given: the path from the
    Prefect task to a training loop is task → this → the stage body → its library
    recipe → the loop (``docs/architecture.md``)."""
    spec = load_spec(name)
    missing = [i for i in spec.inputs if i not in inputs]
    if missing:
        raise TypeError(f"stage {name} needs inputs {missing}")
    rec, log, store = ctx.recorder, logger(), ctx.store
    row = StageRecord(ctx.run_id, name, started_at=utcnow())
    if not spec.kept:
        return None if cached_only else _run_unkept(ctx, spec, args, inputs, row)
    try:
        parts = key_parts(spec, args, inputs, ctx)
    except BaseException as exc:  # e.g. an input file refused by its trust record
        rec.record(row.failed(exc))
        raise
    key, forced = parts.key, name in ctx.force
    reason = None
    if not forced:
        hit, reason = _cached(ctx, spec, args, key, row)
        if hit is not None:
            return hit
    if cached_only:
        return None

    def waiting(info: LeaseInfo) -> None:
        log.info("%s: key %s is being computed by %s; waiting for it", name, key, info.describe())
        rec.record(row.then("waiting", message=f"waiting for {info.describe()}"))

    lease = store.lease(name, key, ctx.run_id)
    waited = lease.acquire(on_wait=waiting)
    try:
        if waited and not forced:
            hit, again = _cached(ctx, spec, args, key, row)
            if hit is not None:
                return hit
            reason = again or reason
        changed = None if forced else why_recomputed(ctx, name, parts)
        rec.record(row.then("running", cache_hit=False))
        log.info("%s: computing (key %s)", name, key)
        t0 = time.perf_counter()
        try:
            run = _stage_run(ctx, spec, parts, lease)
            out = spec.fn(run, args, **{i: inputs[i] for i in spec.inputs})
            manifest = _commit(ctx, spec, args, inputs, parts, lease, run, _typed(spec, out), t0)
            result = _output(manifest, spec, store.final_dir(name, key), hit=False)
        except StageIncomplete as part:
            result = StageOutput(
                stage=name, key=key, root=str(run.work), run_id=run.producer, out=part.out
            )
            outputs = {"key": key, "producer_run_id": run.producer, **result.data}
            rec.record(row.then("completed", cache_hit=False, outputs=outputs, message=str(part)))
            return result
        except StageSkipped as skip:
            rec.record(row.then("skipped", message=str(skip)))
            raise
        except BaseException as exc:
            failed = row.failed(exc, cache_hit=False)
            rec.record(failed)
            ProgressArtifact.settle_open(worker_died_reason() or failed.message or "")
            raise
        notes = list(run.notes)
        if reason:
            notes.insert(0, f"recomputed: the cached result was not usable ({reason})")
        elif changed:
            notes.insert(0, changed)
        outputs = _row_outputs(result, manifest)
        message = "; ".join(notes) or None
        rec.record(row.then("completed", cache_hit=False, outputs=outputs, message=message))
        log.info("%s: done in %.1f s", name, time.perf_counter() - t0)
        return result
    finally:
        lease.release()


def _cached(
    ctx: RunContext, spec: StageSpec, args: Args, key: str, row: StageRecord
) -> tuple[StageOutput | None, str | None]:
    """``(the verified result under key, None)`` — served: its rows ingested into this
    catalog when it lacks them, the ``cached`` record written — or ``(None, why not)``
    (why None: there is none)."""
    store, name = ctx.store, spec.name
    manifest, reason = store.lookup(name, key, ctx.verify)
    if manifest is not None and spec.stale is not None:  # the stage's own check
        reason = spec.stale(args, spec.out_type.model_validate(manifest["out"]))
    if manifest is None or reason is not None:
        if reason:
            logger().warning("%s: cached result not usable (%s); recomputing", name, reason)
        return None, reason
    folder = store.final_dir(name, key)
    result = _output(manifest, spec, folder, hit=True)
    ingested = ensure_ingested(ctx.catalog, folder, manifest.get("rows") or {})
    _ensure_producer_run(ctx, result.run_id)
    msg = None
    if ingested:
        msg = f"rows of tables {', '.join(ingested)} ingested from the stage folder"
        logger().info("%s: %s", name, msg)
    outputs = _row_outputs(result, manifest)
    ctx.recorder.record(row.then("cached", cache_hit=True, outputs=outputs, message=msg))
    logger().info("%s: cache hit (key %s, computed by run %s)", name, key, result.run_id)
    return result, None


def _stage_run(ctx: RunContext, spec: StageSpec, parts: KeyParts, lease: LeaseBase) -> StageRun:
    """The body's :class:`StageRun`: a fresh work folder (an interrupted attempt's, for a
    resumable stage not forced), owned by the run that started it."""
    store, name, key = ctx.store, spec.name, parts.key
    work = store.fresh_work_dir(name, key, lease, resume=spec.resumable and name not in ctx.force)
    owner = work / OWNER_FILE
    producer = (owner.read_text().strip() if owner.exists() else "") or ctx.run_id
    if producer != ctx.run_id:
        logger().info("%s: resuming the attempt of run %s", name, producer)
    owner.write_text(producer)
    return StageRun(
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


def _commit(
    ctx: RunContext,
    spec: StageSpec,
    args: Args,
    inputs: dict[str, StageOutput | None],
    parts: KeyParts,
    lease: LeaseBase,
    run: StageRun,
    out: StageOut,
    t0: float,
) -> dict[str, Any]:
    """Ingest the body's rows and commit its folder with its manifest (returned)."""
    import torch

    content, timed = out.split_measured()
    rows_meta = run.rows.write_parquet()
    # rows reach the catalog before the folder is committed: a failed ingestion fails
    # the stage and leaves nothing in the cache
    ingest(ctx.catalog, run.work, rows_meta)
    entries = {
        "producer_run_id": run.producer,
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
        "device": run.device,
        # CPU results depend on it in the last bits (reductions split by thread)
        "cpu_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "resumed_by_run_id": ctx.run_id if run.producer != ctx.run_id else None,
    }
    return ctx.store.commit(spec.name, parts.key, entries, lease)


def _run_unkept(
    ctx: RunContext,
    spec: StageSpec,
    args: Args,
    inputs: dict[str, StageOutput | None],
    row: StageRecord,
) -> StageOutput:
    """Run a stage kept outside the store (module docstring): its folder is the
    datasets folder, its digest that of its result."""
    rec = ctx.recorder
    rec.record(row)
    root = Path(ctx.datasets)
    run = StageRun(
        ctx=ctx,
        stage=spec.name,
        key="",
        work=root,
        final=root,
        producer=ctx.run_id,
        rows=RowSink(root, ctx.catalog),
    )
    try:
        out = _typed(spec, spec.fn(run, args, **{i: inputs[i] for i in spec.inputs}))
    except StageSkipped as skip:
        rec.record(row.then("skipped", message=str(skip)))
        raise
    except BaseException as exc:
        rec.record(row.failed(exc))
        raise
    content, _ = out.split_measured()
    result = StageOutput(
        stage=spec.name,
        key="",
        root=str(root),
        run_id=ctx.run_id,
        digest=content_digest({}, content),
        out=out,
        cache_hit=run.reused,
    )
    outputs = {"root": str(root), "digest": result.digest, **result.data}
    status = "cached" if run.reused else "completed"
    rec.record(row.then(status, cache_hit=run.reused, outputs=outputs))
    return result


def _typed(spec: StageSpec, out: Any) -> StageOut:
    """The body's result, checked to be of its declared type."""
    if not isinstance(out, spec.out_type):
        raise TypeError(f"stage {spec.name} returned {type(out).__name__}, not {spec.out_type}")
    return out
