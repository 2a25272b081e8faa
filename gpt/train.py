"""The language-model training loop: AdamW, optional warmup + cosine schedule and
gradient clipping, periodic evaluation reported through a metrics callback, periodic
checkpoints and exact resume.

Exact resume: a checkpoint in ``out_dir/"last"`` holds the model, the optimizer state and
a trainer state with the step, epoch, position within the epoch, tokens seen, the
metrics/sample history, and the RNG states (torch's global generator, which drives
dropout, and the loaders' generators) both as they were when the current epoch started
and at the checkpoint. A resumed run re-creates the epoch's batch order from the
epoch-start states, skips the batches already done and then puts the checkpoint-time
states back, so on CPU it continues bit for bit like an uninterrupted run.

Under a torch.distributed process group (see :mod:`gpt.distributed`) the same loop is
data parallel: every rank iterates the same seeded global batch order and trains on its
contiguous shard of each global batch (``batch_size`` must divide by the world size),
through DDP or FSDP2. The loss is token-weighted over the global batch — the sum of the
per-token losses of a shard divided by the global count of non-ignored targets, with
the gradient scaled so the ranks' average is the gradient of the single-process loss —
so per-step losses and weights match a single process up to float rounding. Evaluation
shards each batch the same way and all-reduces the sums; rank 0 alone emits metrics
and samples and writes checkpoints (the others wait); checkpoints keep the
single-process layout plus each rank's RNG state, and every rank resumes from the
same ``last``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt import distributed as gd
from gpt.config import Args, FieldError, operational
from gpt.errors import DataError
from gpt.heap import release_free_memory
from gpt.lm_step import evaluate_lm, lr_at, make_optimizer, train_step
from gpt.train_state import (
    Progress,
    capture_rng,
    has_checkpoint,
    load_resume,
    progress_record,
    progress_state,
    restore_rng,
)

__all__ = [
    "LMTrainArgs",
    "TrainResult",
    "train_lm",
]

log = logging.getLogger(__name__)

LAST = "last"


class LMTrainArgs(Args):
    """Hyperparameters of :func:`train_lm` (defaults: the reference pretraining recipe)."""

    epochs: int = Field(10, ge=1)
    """Passes over the training loader."""
    lr: float = Field(4e-4, ge=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (applied to every parameter, as in the reference)."""
    batch_size: int = Field(2, ge=1)
    """Sequences per optimizer step (the loaders are built with it)."""
    eval_every: int = Field(5, ge=1)
    """Evaluate (and emit metrics) after optimizer steps 1, 1 + eval_every, 1 + 2·eval_every,
    … (the reference's ``global_step % eval_freq == 0`` with a 0-based step) and after the
    last step."""
    eval_batches: int = Field(5, ge=1)
    """Batches of each loader averaged for the train/val loss at an evaluation."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from ``warmup_start_lr`` to ``lr`` over this many steps (0 = none)."""
    warmup_start_lr: float = Field(3e-5, ge=0)
    """Learning rate of the first warmup step (capped at ``lr``)."""
    cosine: bool = False
    """Cosine-decay the learning rate from ``lr`` to ``min_lr`` after the warmup, over the
    rest of ``epochs × len(train_loader)`` steps (``max_steps`` does not shorten it)."""
    min_lr: float = Field(0.0, ge=0)
    """Final learning rate of the cosine decay (at most ``lr``)."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value (None = off)."""
    checkpoint_every: int = operational(0, ge=0)
    """Also checkpoint to ``out_dir/last`` every this many steps (0 = only at the end of
    each epoch and of training)."""
    seed: int = 123
    """Seed of torch's global RNG (dropout) at the start of a fresh run."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps in total (None = run all epochs)."""
    log_every: int = Field(0, ge=0)
    """Also emit a train ``step_loss`` row (the optimizer step's own loss) every this
    many steps (0 = never)."""
    fused: bool | None = None
    """Fused AdamW kernel: None = use it when this torch supports it for the parameters'
    device, True = require it, False = plain implementation."""
    compile: bool = False
    """Run the training steps through ``torch.compile`` (the first steps pay the
    compilation; whether it pays off is measured by ``gptflow bench``)."""

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> Self:
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"{self.min_lr} must not exceed lr ({self.lr})")
        return self


class DistributedLMArgs(LMTrainArgs):
    """:class:`LMTrainArgs` plus the process layout of the training stages that run
    :func:`train_lm` (pretraining, the instruction finetune)."""

    distributed: gd.DistributedArgs = operational(default_factory=gd.DistributedArgs)
    """How many processes train (``nproc = 1``: the calling process; more: under
    torchrun, see :class:`~gpt.distributed.DistributedArgs`). ``batch_size`` stays the
    global batch and must split evenly over the processes. The recipes launch
    themselves on this layout (:func:`gpt.distributed.launch.launchable`). Operational: with dropout off, N processes
    give the per-step losses and final weights of 1 process with the same global batch
    within ~1e-5 (float rounding), so the layout is not part of the cache key; with
    dropout on, the masks depend on the layout and another layout gives an equally valid
    but different sample, served from the same cache entry."""

    @field_validator("distributed")
    @classmethod
    def _batch_splits(cls, v: gd.DistributedArgs, info: ValidationInfo) -> gd.DistributedArgs:
        if "batch_size" in info.data:  # else batch_size itself was invalid
            v.check_batch(info.data["batch_size"], "batch_size")
        return v


@dataclass
class TrainResult:
    """What :func:`train_lm` returns."""

    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    epochs_completed: int
    """Whole epochs finished."""
    tokens_seen: int
    """Training input tokens processed."""
    train_seconds: float
    """Wall seconds spent in training steps (evaluation and checkpoints excluded), summed
    over resumed runs."""
    tokens_per_s: float
    """``tokens_seen / train_seconds``."""
    final_train_loss: float
    """Train loss at the last evaluation (NaN when none)."""
    final_val_loss: float
    """Validation loss at the last evaluation (NaN when none)."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Every metrics row of the run, including those emitted before a resume."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Every per-epoch sample ``{epoch, step, prompt, text}``."""
    finished: bool = False
    """True when all epochs (or ``max_steps``) are done."""
    resumed_from_step: int | None = None
    """Step of the checkpoint this run continued from (None for a fresh run)."""
    last_checkpoint: Path | None = None
    """``out_dir/last`` when checkpoints were written."""


# --------------------------------------------------------------------------- the loop


def train_lm(
    model: nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any] | None,
    args: LMTrainArgs,
    *,
    out_dir: Path | None = None,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    resume: bool = True,
    tokenizer: Any = None,
    sample_prompt: str | None = None,
    sample_tokens: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (a GPT, on the device it is on) as a next-token language model.

    At each evaluation step four rows ``{step, epoch, seen, split, name, value}`` go to
    ``on_metrics`` (as one list): train ``loss``, val ``loss``, train ``lr`` and train
    ``tokens_per_s`` (training tokens per second since the previous evaluation); with
    ``args.log_every`` a train ``step_loss`` row joins them every that many steps.
    ``step`` counts optimizer steps from 1, ``epoch`` is 1-based, ``seen`` is the number of
    training tokens processed. After each epoch, when ``tokenizer`` and ``sample_prompt``
    are set and ``sample_tokens`` > 0, a greedy sample ``{epoch, step, prompt, text}`` of
    ``sample_tokens`` new tokens goes to ``on_sample``. ``on_progress(step, steps)``
    follows the optimizer steps: called at the start and after every step with the
    steps done and the steps this run will take in total (``epochs × len(train_loader)``,
    at most ``args.max_steps``), so a caller never derives that count itself.

    With ``out_dir``, checkpoints (model, optimizer, trainer state) go to
    ``out_dir/"last"`` at the end of each epoch, every ``args.checkpoint_every`` steps and
    at the end; with ``resume`` an existing ``out_dir/"last"`` is continued from exactly:
    rows and samples of steps up to that checkpoint are not emitted again (rows emitted
    after it by the interrupted run are, so persist them keyed by step). Exact resume
    needs loaders from :func:`gpt.data.windows.make_loader` (or any loader whose shuffling uses
    torch's global RNG); the data must be the same.

    Under a process group (module docstring) the loaders yield global batches, callbacks
    fire on rank 0 only and ``out_dir`` must be one folder every rank sees.
    """
    if len(train_loader) == 0:
        raise DataError(
            "the training loader yields no batches (too few tokens for one window/batch); "
            "use more text, a shorter max_length or a smaller batch_size"
        )
    world, main = gd.world_size(), gd.is_main()
    gd.require_divisible(args.batch_size, "batch_size")
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    stop_at = min(total_steps, args.max_steps) if args.max_steps else total_steps
    device = next(model.parameters()).device
    engine = gd.TrainEngine(model, device)
    optimizer = make_optimizer(engine.train_module, args)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    last = Path(out_dir) / LAST if out_dir is not None else None

    prog = Progress()
    resumed_from: int | None = None
    saved_rng: dict[str, Any] | None = None
    epoch_rng: dict[str, Any] | None = None
    found = False
    if resume and last is not None:
        with gd.main_first():  # rank 0 may first put back a ``last`` a kill left aside
            found = has_checkpoint(last)
        found = bool(gd.all_gather_objects(found)[0])
    if found:
        assert last is not None
        prog, saved_rng, epoch_rng = load_resume(
            last, engine, optimizer, steps_per_epoch, args.seed
        )
        resumed_from = prog.step
        restore_rng(saved_rng, train_loader, val_loader)
        log.info("resuming from %s at step %d (epoch %d)", last, prog.step, prog.epoch + 1)
    else:
        torch.manual_seed(args.seed + gd.rank())  # dropout masks differ per rank

    # what shapes the training (operational settings such as checkpoint_every are no part)
    hparams = {**args.key_dict(), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}

    def save(epoch_start: dict[str, Any] | None) -> None:
        if last is None:
            return
        from gpt.checkpoint import save_checkpoint

        carrier, opt_state = engine.full_state(optimizer)  # collective under FSDP
        rng = capture_rng(train_loader, val_loader)
        per_rank = gd.all_gather_objects({k: rng[k] for k in ("torch", "cuda") if k in rng})
        state = progress_state(
            prog,
            rng=rng,
            epoch_start=epoch_start,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            world=world,
            per_rank=per_rank,
        )
        if main:
            save_checkpoint(
                last,
                carrier,
                hparams=hparams,
                optimizer=opt_state,
                extra_state=state,
                record=progress_record(prog),
            )
        gd.barrier()

    def eval_loss(loader: Any) -> float:
        if world == 1:
            return evaluate_lm(engine.eval_module, loader, args.eval_batches)
        return gd.evaluate_lm_sharded(engine.eval_module, loader, args.eval_batches, device)

    def evaluate() -> list[dict[str, Any]]:
        train_loss = eval_loss(train_loader)
        val_loss = eval_loss(val_loader) if val_loader is not None else float("nan")
        base = {"step": prog.step, "epoch": prog.epoch + 1, "seen": prog.tokens_seen}
        tps = interval_tokens / interval_seconds if interval_seconds > 0 else float("nan")
        rows = [
            {**base, "split": "train", "name": "loss", "value": train_loss},
            {**base, "split": "val", "name": "loss", "value": val_loss},
            {**base, "split": "train", "name": "lr", "value": current_lr},
            {**base, "split": "train", "name": "tokens_per_s", "value": tps},
        ]
        if main:
            log.info(
                "epoch %d step %d: train loss %.3f, val loss %.3f, %.0f tokens/s",
                prog.epoch + 1, prog.step, train_loss, val_loss, tps,
            )  # fmt: skip
        return rows

    def sample() -> None:
        if tokenizer is None or not sample_prompt or sample_tokens <= 0:
            return
        if not main and engine.strategy != "fsdp":  # FSDP forwards are collective
            return
        from gpt.generate import generate

        prompt_ids = tokenizer.encode(sample_prompt)
        with engine.unsharded() as module:
            new = generate(module, [prompt_ids], sample_tokens)[0]  # type: ignore[arg-type]
        row = {
            "epoch": prog.epoch + 1,
            "step": prog.step,
            "prompt": sample_prompt,
            "text": tokenizer.decode(prompt_ids + new),
        }
        prog.samples.append(row)
        if main:
            log.info("sample after epoch %d: %r", row["epoch"], row["text"])
            if on_sample is not None:
                on_sample(row)

    step_model = torch.compile(model) if args.compile else model
    interval_tokens, interval_seconds = 0, 0.0
    current_lr = lr_at(prog.step, args, total_steps)
    engine.train_module.train()
    bar = tqdm(
        total=stop_at,
        initial=min(prog.step, stop_at),
        desc="train",
        disable=not progress or not main,
    )
    if on_progress is not None and main:
        on_progress(prog.step, stop_at)
    try:
        while prog.step < stop_at and prog.epoch < args.epochs:
            if prog.position > 0:  # resuming inside an epoch: replay its batch order
                assert saved_rng is not None and epoch_rng is not None
                epoch_start = epoch_rng
                restore_rng(epoch_start, train_loader, val_loader)
                it = iter(train_loader)
                for _ in range(prog.position):
                    next(it)
                restore_rng(saved_rng, train_loader, val_loader)
            else:
                epoch_start = capture_rng(train_loader, val_loader)
                it = iter(train_loader)
            stopped = False
            for x, y in it:
                current_lr = lr_at(prog.step, args, total_steps)
                t0 = time.perf_counter()
                if world == 1:
                    x, y = x.to(device), y.to(device)
                    loss, _ = train_step(
                        step_model, optimizer, x, y, lr=current_lr, grad_clip=args.grad_clip
                    )
                else:
                    loss = gd.lm_step_sharded(
                        engine.train_module, optimizer, params, x, y, device,
                        lr=current_lr, grad_clip=args.grad_clip,
                    )  # fmt: skip
                dt = time.perf_counter() - t0
                prog.step += 1
                prog.position += 1
                prog.tokens_seen += x.numel()
                prog.train_seconds += dt
                interval_tokens += x.numel()
                interval_seconds += dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if on_progress is not None and main:
                    on_progress(prog.step, stop_at)
                is_last = prog.step >= stop_at
                rows: list[dict[str, Any]] = []
                if args.log_every and prog.step % args.log_every == 0:
                    base = {"step": prog.step, "epoch": prog.epoch + 1, "seen": prog.tokens_seen}
                    rows.append({**base, "split": "train", "name": "step_loss", "value": loss})
                if (prog.step - 1) % args.eval_every == 0 or is_last:
                    rows += evaluate()
                    interval_tokens, interval_seconds = 0, 0.0
                if rows:
                    prog.metrics.extend(rows)
                    if on_metrics is not None and main:
                        on_metrics(rows)
                if prog.position < steps_per_epoch and (
                    is_last or (args.checkpoint_every and prog.step % args.checkpoint_every == 0)
                ):
                    prog.finished = is_last
                    save(epoch_start)
                if is_last and prog.position < steps_per_epoch:
                    stopped = True
                    break
            if stopped:
                break
            # the loader is exhausted: epoch done (its sampler has drawn everything it draws)
            sample()
            prog.epoch += 1
            prog.position = 0
            prog.finished = prog.step >= stop_at or prog.epoch >= args.epochs
            save(None)
    finally:
        bar.close()
        release_free_memory()  # what gpt.heap's malloc settings kept for the steps
    engine.finish()
    prog.finished = prog.finished or prog.step >= stop_at or prog.epoch >= args.epochs

    def final(split: str) -> float:
        vals = [r["value"] for r in prog.metrics if r["split"] == split and r["name"] == "loss"]
        return float(vals[-1]) if vals else float("nan")

    return TrainResult(
        steps=prog.step,
        epochs_completed=prog.epoch,
        tokens_seen=prog.tokens_seen,
        train_seconds=prog.train_seconds,
        tokens_per_s=prog.tokens_seen / prog.train_seconds if prog.train_seconds else 0.0,
        final_train_loss=final("train"),
        final_val_loss=final("val"),
        metrics=list(prog.metrics),
        samples=list(prog.samples),
        finished=prog.finished,
        resumed_from_step=resumed_from,
        last_checkpoint=last if last is not None and last.exists() else None,
    )
