"""Prefect tasks, one per pipeline stage: thin wrappers that call the ``gpt`` library,
write the stage's rows to the catalog and return a small :class:`StageOutput` manifest.

Caching is content-addressed (:mod:`tasks.cache`): a task first looks its key up and
returns the verified manifest on a hit, recording ``cache_hit`` in ``stages``.
Tasks never pass tensors or models between each other, only paths and manifests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from gpt.data.download import DownloadArgs
from gpt.errors import GPTFlowError, JudgeError
from gpt.eval.baseline import BaselineArgs
from gpt.eval.judge import JudgeConfig
from gpt.recipes.base import LoadGPT2Args
from gpt.recipes.classifier import SpamArgs
from gpt.recipes.instruct import ExtractArgs, InstructArgs
from gpt.recipes.prepare import PrepareArgs
from gpt.recipes.pretrain import PretrainArgs
from tasks.cache import StageCache, StageOutput
from tasks.catalog import Catalog

#: Library modules each stage runs; their source is part of the stage's cache key.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "download": ("gpt.data.download", "gpt.data.sources"),
    "tokenize": (
        "gpt.recipes.prepare",
        "gpt.data.parsing",
        "gpt.data.windows",
        "gpt.tokenizer",
        "tasks.stages",
    ),
    "pretrain": (
        "gpt.recipes.pretrain",
        "gpt.train",
        "gpt.data.windows",
        "gpt.model",
        "gpt.generate",
        "gpt.checkpoint",
        "gpt.tokenizer",
    ),
    "load_gpt2": (
        "gpt.weights.openai",
        "gpt.model",
        "gpt.checkpoint",
        "gpt.generate",
        "gpt.data.windows",
        "gpt.train",
    ),
    "finetune_spam": ("gpt.recipes.classifier", "gpt.model", "gpt.checkpoint", "gpt.tokenizer"),
    "baseline_spam": ("gpt.eval.baseline",),
    "finetune_instruct": (
        "gpt.recipes.instruct",
        "gpt.train",
        "gpt.model",
        "gpt.checkpoint",
        "gpt.prompts",
        "gpt.tokenizer",
    ),
    "extract_responses": (
        "gpt.recipes.instruct",
        "gpt.generate",
        "gpt.model",
        "gpt.checkpoint",
        "gpt.prompts",
        "gpt.tokenizer",
    ),
}


@dataclass(frozen=True)
class RunContext:
    """What every task needs to know about the run (small and JSON-able)."""

    run_id: str
    db_path: str
    artifacts: str
    datasets: str
    mirror: str | None = None
    device: str = "auto"
    force: tuple[str, ...] = ()
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.db_path)

    @property
    def cache(self) -> StageCache:
        return StageCache(Path(self.artifacts) / "stages")


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow/task run (task.fn in tests)
        return logging.getLogger("gptflow.stages")


def _now() -> datetime:
    return datetime.now(UTC)


class _Progress:
    """A Prefect progress artifact updated from a training loop's metric callbacks."""

    def __init__(self, key: str, total: int | None) -> None:
        self.total = total
        self.id = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(progress=0.0, key=key, description=key)
        except Exception:  # no run context (tests calling .fn)
            self.id = None

    def update(self, done: int) -> None:
        if self.id is None or not self.total:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(100.0, 100.0 * done / self.total))
        except Exception:
            pass


def execute_stage(
    ctx: RunContext,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, StageOutput | None],
    body: Callable[[Path, str], tuple[dict[str, Any], list[str]]],
    *,
    resume: bool = False,
    after_commit: Callable[[StageOutput], None] | None = None,
) -> StageOutput:
    """Run ``body(work_dir, producer_run_id) -> (data, files)`` unless a verified cached
    result exists.

    The producer is the run that started this computation: when a crashed attempt is
    resumed (``resume=True``), rows keep going to the original run, so a resumed
    trajectory is stored once, under one run id. ``after_commit`` records catalog rows
    that need final paths (checkpoints)."""
    log = _logger()
    cat = ctx.catalog
    cache = ctx.cache
    key = cache.key(stage, config, inputs, STAGE_MODULES[stage])
    started = _now()
    if stage not in ctx.force:
        hit = cache.lookup(stage, key)
        if hit is not None:
            hit.cache_hit = True
            cat.record_stage(
                ctx.run_id,
                stage,
                status="cached",
                started_at=started,
                ended_at=_now(),
                cache_hit=True,
                outputs={"key": key, "root": hit.root, "producer_run_id": hit.run_id, **hit.data},
            )
            log.info("%s: cache hit (key %s, computed by run %s)", stage, key, hit.run_id)
            return hit
    cat.record_stage(ctx.run_id, stage, status="running", started_at=started, cache_hit=False)
    log.info("%s: computing (key %s)", stage, key)
    t0 = time.perf_counter()
    try:
        work = cache.fresh_work_dir(stage, key, resume=resume)
        owner = work / ".owner_run"
        if owner.exists():
            producer = owner.read_text().strip() or ctx.run_id
            log.info("%s: resuming the attempt of run %s", stage, producer)
        else:
            producer = ctx.run_id
            owner.write_text(producer)
        data, files = body(work, producer)
        data = {**data, "wall_s": round(time.perf_counter() - t0, 3)}
        if producer != ctx.run_id:
            data["resumed_by_run_id"] = ctx.run_id
        out = cache.commit(stage, key, producer, data, files)
        if after_commit is not None:
            after_commit(out)
    except BaseException as exc:
        cat.record_stage(
            ctx.run_id,
            stage,
            status="failed",
            started_at=started,
            ended_at=_now(),
            cache_hit=False,
            message=f"{type(exc).__name__}: {exc}"[:4000],
        )
        raise
    cat.record_stage(
        ctx.run_id,
        stage,
        status="completed",
        started_at=started,
        ended_at=_now(),
        cache_hit=False,
        outputs={"key": key, "root": out.root, "producer_run_id": out.run_id, **out.data},
    )
    log.info("%s: done in %.1f s", stage, time.perf_counter() - t0)
    return out


def _checkpoint_recorder(ctx: RunContext, stage: str, rels: list[str]) -> Callable:
    def record(out: StageOutput) -> None:
        for rel in rels:
            p = out.path(rel)
            cfg_path = p / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
            ctx.catalog.record_checkpoint(out.run_id, stage, str(p), config=cfg)
            _link_artifact(stage, p)

    return record


def _link_artifact(stage: str, path: Path) -> None:
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(
            key=f"{stage.replace('_', '-')}-checkpoint",
            link=path.resolve().as_uri(),
            link_text=str(path),
            description=f"{stage} checkpoint folder",
        )
    except Exception:
        pass


_METRIC_KEY = ["run_id", "stage", "step", "split", "name"]


def _metrics_sink(
    ctx: RunContext, stage: str, producer: str, progress: _Progress | None = None
) -> Callable:
    """on_metrics callback: upsert rows (keyed by run, stage, step, split, name, so rows a
    resumed loop sends again replace themselves) and advance the progress artifact."""

    def sink(rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = _now()
        ctx.catalog.upsert_rows(
            "metrics",
            [{"time": now, **r, "run_id": producer, "stage": stage} for r in rows],
            key=_METRIC_KEY,
        )
        if progress is not None:
            progress.update(max(int(r.get("step") or 0) for r in rows))

    return sink


def _sample_sink(ctx: RunContext, stage: str, producer: str) -> Callable:
    def sink(sample: dict[str, Any]) -> None:
        ctx.catalog.upsert_rows(
            "samples",
            [
                {
                    "run_id": producer,
                    "stage": stage,
                    "epoch": sample.get("epoch"),
                    "step": sample.get("step"),
                    "prompt": sample.get("prompt"),
                    "text": sample.get("text"),
                    "time": _now(),
                }
            ],
            key=["run_id", "stage", "epoch", "step"],
        )
        _logger().info("%s sample (epoch %s): %r", stage, sample.get("epoch"), sample.get("text"))

    return sink


# --------------------------------------------------------------------------- download


@task(name="download", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def download_task(ctx: RunContext, cfg: DownloadArgs) -> StageOutput:
    """Fetch the datasets and tokenizer files (skipping verified ones) and record sources."""
    from gpt.data.sources import DATASET_SOURCES

    started = _now()
    cat = ctx.catalog
    cat.record_stage(ctx.run_id, "download", status="running", started_at=started)
    try:
        results = cfg.fetch(
            list(DATASET_SOURCES), ctx.datasets, mirror=ctx.mirror, progress=ctx.progress
        )
    except BaseException as exc:
        cat.record_stage(
            ctx.run_id,
            "download",
            status="failed",
            started_at=started,
            ended_at=_now(),
            message=f"{type(exc).__name__}: {exc}"[:4000],
        )
        raise
    data: dict[str, Any] = {"sources": {}}
    for res in results:
        for f in res.files:
            cat.record_source(
                f"{res.name}:{f.relpath}" if len(res.files) > 1 else res.name,
                f.url or "",
                f.sha256,
                f.bytes,
            )
        data["sources"][res.name] = {
            "path": str(res.path),
            "folder": str(res.folder),
            "sha256": [f.sha256 for f in res.files],
        }
    skipped = all(r.skipped for r in results)
    out = StageOutput(
        stage="download",
        key="",
        root=str(ctx.datasets),
        run_id=ctx.run_id,
        data=data,
        cache_hit=skipped,
    )
    from tasks.cache import content_digest

    out.digest = content_digest({}, {k: v["sha256"] for k, v in data["sources"].items()})
    cat.record_stage(
        ctx.run_id,
        "download",
        status="cached" if skipped else "completed",
        started_at=started,
        ended_at=_now(),
        cache_hit=skipped,
        outputs=data,
    )
    return out


# --------------------------------------------------------------------------- tokenize


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(ctx: RunContext, args: PrepareArgs, dl: StageOutput) -> StageOutput:
    """Parse and split the inputs, tokenize the text; rows into the dataset tables."""
    from gpt.recipes.prepare import prepare_datasets

    src = dl.data["sources"]

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        res = prepare_datasets(
            text_path=Path(src["the-verdict"]["path"]),
            sms_path=Path(src["sms-spam"]["path"]),
            instructions_path=Path(src["instruction-data"]["path"]),
            tokenizer_dir=Path(src["gpt2-tokenizer"]["folder"]),
            out_dir=work,
            args=args,
        )
        _write_dataset_rows(ctx, producer, work, res.to_dict(), src["sms-spam"]["sha256"][-1])
        return {
            "corpus": res.corpus,
            "spam_counts": res.spam_counts,
            "instruct_counts": res.instruct_counts,
            "manifests": res.manifests,
            "max_length": args.max_length,
            "stride": args.stride,
        }, res.files

    return execute_stage(ctx, "tokenize", args.to_dict(), {"download": dl}, body)


def _write_dataset_rows(
    ctx: RunContext, run_id: str, work: Path, res: dict[str, Any], sms_sha: str
) -> None:
    """The four dataset tables in one transaction: all replaced, or none."""
    from gpt.recipes.prepare import load_instruct_splits

    messages = json.loads((work / "spam" / "messages.json").read_text(encoding="utf-8"))
    spam = json.loads((work / "spam" / "splits.json").read_text(encoding="utf-8"))
    inst = load_instruct_splits(work / "instruct" / "splits.json")
    ctx.catalog.replace_many(
        [
            (
                "sms_messages",
                [{**m, "source_sha256": sms_sha} for m in messages],
                {"source_sha256": sms_sha},
            ),
            (
                "spam_examples",
                [
                    {"run_id": run_id, "split": s, **{k: r[k] for k in ("idx", "label", "text")}}
                    for s, recs in spam.items()
                    for r in recs
                ],
                {"run_id": run_id},
            ),
            (
                "instructions",
                [
                    {
                        "run_id": run_id,
                        "split": s,
                        **{k: r[k] for k in ("idx", "instruction", "input", "output")},
                    }
                    for s, recs in inst.items()
                    for r in recs
                ],
                {"run_id": run_id},
            ),
            ("corpus", [{"run_id": run_id, **c} for c in res["corpus"]], {"run_id": run_id}),
        ]
    )


# --------------------------------------------------------------------------- pretrain


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(ctx: RunContext, args: PretrainArgs, tok: StageOutput) -> StageOutput:
    """Train a GPT from scratch on the tokenized text (resumable after a crash)."""
    from gpt.recipes.pretrain import pretrain

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        n_train = next(c["windows"] for c in tok.data["corpus"] if c["split"] == "train")
        steps = (n_train // args.batch_size) * args.epochs
        if args.max_steps:
            steps = min(steps, args.max_steps)
        progress = _Progress("pretrain-progress", steps)
        res = pretrain(
            tok.path("tokens/train.npy"),
            tok.path("tokens/val.npy"),
            tok.path("tokenizer"),
            work,
            args,
            max_length=tok.data["max_length"],
            stride=tok.data["stride"],
            device=ctx.device,
            keep_last=False,
            on_metrics=_metrics_sink(ctx, "pretrain", producer, progress),
            on_sample=_sample_sink(ctx, "pretrain", producer),
            progress=ctx.progress,
        )
        data = {
            "final": "final",
            "loss_png": "loss.png" if res.loss_png else None,
            "steps": res.steps,
            "epochs": res.epochs,
            "tokens_seen": res.tokens_seen,
            "tokens_per_s": res.tokens_per_s,
            "train_seconds": res.train_seconds,
            "final_train_loss": res.final_train_loss,
            "final_val_loss": res.final_val_loss,
            "train_windows": res.train_windows,
            "val_windows": res.val_windows,
            "parameters": res.parameters,
            "resumed_from_step": res.resumed_from_step,
            "samples": res.samples,
            "device": res.device,
        }
        return data, ["final/model.safetensors", "final/config.json"]

    return execute_stage(
        ctx,
        "pretrain",
        args.to_dict(),
        {"tokenize": tok},
        body,
        resume=True,
        after_commit=_checkpoint_recorder(ctx, "pretrain", ["final"]),
    )


# --------------------------------------------------------------------------- load_gpt2


@task(name="load_gpt2", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_gpt2_task(
    ctx: RunContext,
    args: LoadGPT2Args,
    dl_args: DownloadArgs,
    tok: StageOutput,
    pre: StageOutput,
) -> StageOutput:
    """Import OpenAI GPT-2 weights (or, with base_model='scratch', take the pretrain
    checkpoint) as the base of the finetune stages; record a sample and perplexity."""
    from gpt.data.sources import gpt2_source_name
    from gpt.recipes.base import prepare_bases

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        releases: dict[str, Path] = {}
        if args.sizes():
            results = dl_args.fetch(
                [gpt2_source_name(s) for s in args.sizes()],
                ctx.datasets,
                mirror=ctx.mirror,
                progress=ctx.progress,
            )
            for res in results:
                for f in res.files:
                    ctx.catalog.record_source(
                        f"{res.name}:{f.relpath}", f.url or "", f.sha256, f.bytes
                    )
            releases = {s: r.folder for s, r in zip(args.sizes(), results, strict=True)}
        res = prepare_bases(
            args,
            work,
            tokenizer_dir=tok.path("tokenizer"),
            val_tokens=tok.path("tokens/val.npy"),
            pretrain_checkpoint=pre.path("final"),
            releases=releases,
            device=ctx.device,
        )
        for folder, ev in res.evaluations.items():
            _sample_sink(ctx, "load_gpt2", producer)({"epoch": None, "step": None, **ev["sample"]})
            name = "perplexity" if folder == "scratch" else f"perplexity_{folder[5:]}"
            ctx.catalog.record_metrics(
                producer,
                "load_gpt2",
                [{"split": "val", "name": name, "value": ev["val_perplexity"], "step": 0}],
            )
        info = {
            "base_model": args.base_model,
            "bases_rel": {"spam": res.spam, "instruct": res.instruct},
            "evaluations": res.evaluations,
            "pretrain_digest": pre.digest if args.base_model == "scratch" else None,
        }
        files = [
            f"{folder}/{name}"
            for folder in dict.fromkeys([res.spam, res.instruct])
            for name in ("model.safetensors", "config.json")
        ]
        return info, files

    def record(out: StageOutput) -> None:
        folders = list(dict.fromkeys(out.data["bases_rel"].values()))
        _checkpoint_recorder(ctx, "load_gpt2", folders)(out)

    inputs = (
        {"tokenize": tok, "pretrain": pre} if args.base_model == "scratch" else {"tokenize": tok}
    )
    out = execute_stage(ctx, "load_gpt2", args.to_dict(), inputs, body, after_commit=record)
    out.data["bases"] = {k: str(out.path(v)) for k, v in out.data["bases_rel"].items()}
    return out


# --------------------------------------------------------------------------- spam


@task(name="finetune_spam", cache_policy=NO_CACHE)
def finetune_spam_task(
    ctx: RunContext, args: SpamArgs, tok: StageOutput, base: StageOutput
) -> StageOutput:
    """Finetune the base model as a spam classifier (frozen-prefix caching)."""
    from gpt.recipes.classifier import finetune_classifier
    from gpt.recipes.prepare import load_spam_splits

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        splits = load_spam_splits(tok.path("spam/splits.json"))
        res = finetune_classifier(
            Path(base.data["bases"]["spam"]),
            splits,
            args,
            out_dir=work / "classifier",
            tokenizer_dir=tok.path("tokenizer"),
            device=ctx.device,
            on_metrics=_metrics_sink(ctx, "finetune_spam", producer),
            progress=ctx.progress,
        )
        # issue 12: per-example predictions go to the catalog, not into the manifest
        ctx.catalog.replace_rows(
            "predictions",
            [
                {"run_id": producer, "stage": "finetune_spam", "model": "finetuned", **r}
                for r in res.pop("predictions")
            ],
            where={"run_id": producer, "stage": "finetune_spam"},
        )
        return res, ["classifier/model.safetensors", "classifier/config.json"]

    return execute_stage(
        ctx,
        "finetune_spam",
        args.to_dict(),
        {"tokenize": tok, "load_gpt2": base},
        body,
        after_commit=_checkpoint_recorder(ctx, "finetune_spam", ["classifier"]),
    )


@task(name="baseline_spam", cache_policy=NO_CACHE)
def baseline_spam_task(ctx: RunContext, args: BaselineArgs, tok: StageOutput) -> StageOutput:
    """Majority-class and logistic-regression baselines on the same spam splits."""
    from gpt.eval.baseline import evaluate_baselines
    from gpt.recipes.prepare import load_spam_splits

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        splits = load_spam_splits(tok.path("spam/splits.json"))
        result = evaluate_baselines(splits, args)  # issue 12: rows + per-example predictions
        rows = result.rows
        ctx.catalog.replace_many(
            [
                ("baselines", [{"run_id": producer, **r} for r in rows], {"run_id": producer}),
                (
                    "predictions",
                    [
                        {"run_id": producer, "stage": "baseline_spam", **r}
                        for r in result.predictions
                    ],
                    {"run_id": producer, "stage": "baseline_spam"},
                ),
            ]
        )
        (work / "baselines.json").write_text(json.dumps(rows, indent=1, default=str))
        return {"rows": rows}, ["baselines.json"]

    return execute_stage(ctx, "baseline_spam", args.to_dict(), {"tokenize": tok}, body)


# --------------------------------------------------------------------------- instruct


@task(name="finetune_instruct", cache_policy=NO_CACHE)
def finetune_instruct_task(
    ctx: RunContext, args: InstructArgs, tok: StageOutput, base: StageOutput
) -> StageOutput:
    """Instruction-finetune the base model on the Alpaca-formatted train split."""
    from gpt.recipes.instruct import finetune_instruct
    from gpt.recipes.prepare import load_instruct_splits

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        splits = load_instruct_splits(tok.path("instruct/splits.json"))
        steps = math.ceil(len(splits["train"]) / args.batch_size) * args.epochs
        if args.max_steps:
            steps = min(steps, args.max_steps)
        progress = _Progress("finetune-instruct-progress", steps)
        res = finetune_instruct(
            Path(base.data["bases"]["instruct"]),
            splits["train"],
            splits["val"],
            args,
            out_dir=work / "instruct",
            device=ctx.device,
            on_metrics=_metrics_sink(ctx, "finetune_instruct", producer, progress),
            on_sample=_sample_sink(ctx, "finetune_instruct", producer),
            progress=ctx.progress,
        )
        return res, ["instruct/model.safetensors", "instruct/config.json"]

    return execute_stage(
        ctx,
        "finetune_instruct",
        args.to_dict(),
        {"tokenize": tok, "load_gpt2": base},
        body,
        resume=True,
        after_commit=_checkpoint_recorder(ctx, "finetune_instruct", ["instruct"]),
    )


@task(name="extract_responses", cache_policy=NO_CACHE)
def extract_responses_task(
    ctx: RunContext, args: ExtractArgs, tok: StageOutput, inst: StageOutput
) -> StageOutput:
    """Greedy responses for the test split -> ``responses`` rows and a JSON export."""
    from gpt.recipes.instruct import export_responses_json, extract_responses
    from gpt.recipes.prepare import load_instruct_splits

    def body(work: Path, producer: str) -> tuple[dict[str, Any], list[str]]:
        test = load_instruct_splits(tok.path("instruct/splits.json"))["test"]
        rows = extract_responses(
            inst.path("instruct"),
            test,
            args,
            device=ctx.device,
            progress=ctx.progress,
        )
        ctx.catalog.replace_rows(
            "responses",
            [{"run_id": producer, **r} for r in rows],
            where={"run_id": producer},
        )
        export_responses_json(rows, work / "responses.json")
        gen_s = sum(r["seconds"] for r in rows)
        new_tokens = sum(r["new_tokens"] for r in rows)
        return {
            "n": len(rows),
            "new_tokens": new_tokens,
            "generation_s": round(gen_s, 3),
            "responses_json": "responses.json",
        }, ["responses.json"]

    return execute_stage(
        ctx, "extract_responses", args.to_dict(), {"tokenize": tok, "finetune_instruct": inst}, body
    )


# --------------------------------------------------------------------------- judge


@task(name="judge", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def judge_task(ctx: RunContext, jcfg: JudgeConfig, resp: StageOutput) -> dict[str, Any]:
    """Score the responses with the Ollama judge. Resumes: only unscored examples are
    sent. With ``required`` false an unreachable server or missing model ends the stage
    as Skipped with the fix recorded."""
    from tasks.judging import judge_run

    cat = ctx.catalog
    started = _now()
    producer = resp.run_id
    cat.record_stage(ctx.run_id, "judge", status="running", started_at=started)
    try:
        summary = judge_run(cat, producer, jcfg, progress=ctx.progress)
    except JudgeError as exc:
        fix = (
            "start Ollama with `ollama serve`, pull the judge with "
            f"`ollama pull {jcfg.model}`, then run `gptflow rerun judge`"
        )
        msg = f"{exc} — fix: {fix}"
        if jcfg.required:
            cat.record_stage(
                ctx.run_id,
                "judge",
                status="failed",
                started_at=started,
                ended_at=_now(),
                message=msg,
            )
            raise
        _logger().warning("judge skipped: %s", msg)
        cat.record_stage(
            ctx.run_id,
            "judge",
            status="skipped",
            started_at=started,
            ended_at=_now(),
            message=msg,
        )
        return {"status": "skipped", "message": msg, "responses_run_id": producer}
    except GPTFlowError as exc:
        cat.record_stage(
            ctx.run_id,
            "judge",
            status="failed",
            started_at=started,
            ended_at=_now(),
            message=str(exc),
        )
        raise
    info = dataclasses.asdict(summary)
    sent = info["n_sent"]
    cat.record_stage(
        ctx.run_id,
        "judge",
        status="cached" if sent == 0 else "completed",
        started_at=started,
        ended_at=_now(),
        cache_hit=sent == 0,
        outputs={"responses_run_id": producer, **info},
    )
    return {"status": "completed", "responses_run_id": producer, **info}
