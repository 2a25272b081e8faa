"""Spam classifier finetuning: the reference recipe plus frozen-prefix activation caching.

The reference recipe replaces the LM head by ``Linear(emb, 2)``, freezes the model,
unfreezes the last ``N`` transformer blocks and the final LayerNorm, and trains on the
logits of the last position of each (padded) message.

Frozen-prefix caching: the embeddings and the first ``n_layers - N`` blocks are frozen
and run without dropout (eval mode), so their output is a fixed function of the input
ids. :func:`finetune_classifier` computes those hidden states once per split and then
trains only the trainable suffix on them; with the same batch order the per-step losses
equal the full-forward method's (``prefix_cache=False``), which shares the same loop.

Labels: ham = 0, spam = 1.

Under a torch.distributed process group (``gpt.distributed.run_distributed``) the
finetune is data parallel with DDP: every rank draws the same seeded batch order and
trains on its contiguous shard of each global batch (``batch_size`` must divide by the
world size); the loss is the global batch's mean, so per-step losses and weights match
one process up to float rounding. The prefix cache and the evaluations are computed on
contiguous shards of the rows and gathered; rank 0 alone emits rows and writes the
checkpoint. (FSDP is not offered: only a small suffix trains, and the prefix cache
calls blocks outside the root module's forward.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt import distributed as gd
from gpt.adapter import model_size
from gpt.args import SpamArgs
from gpt.device import resolve_device
from gpt.distributed.launch import asks_torchrun, relaunch
from gpt.errors import ConfigError, DataError
from gpt.eval.baseline import Splits, binary_metrics, check_spam_splits, prediction_rows
from gpt.heap import release_free_memory
from gpt.lm_step import adamw
from gpt.recipes.classifier_model import (
    LABELS,
    SplitData,
    StepModule,
    batch_logits,
    build_cache,
    build_classifier,
    encode_spam,
    evaluate,
    last_real_index,
    n_frozen_blocks,
    set_dropout,
    set_modes,
    sharded_backward,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[list[dict[str, Any]]], None]


def _check_splits(splits: Splits) -> None:
    check_spam_splits(splits)
    for name, (texts, _) in splits.items():
        if not texts:
            raise DataError(f"spam split {name!r} is empty")


# --------------------------------------------------------------------------- training


def prepare_classifier(model: nn.Module, args: SpamArgs, *, base_dir: Path | None) -> nn.Module:
    """``model`` (a GPT as loaded from ``base_dir``) made the classifier ``args`` trains:
    the class head, what is frozen, and with ``args.lora`` the adapters (the base
    identity recorded for the LoRA checkpoint). In place; returns the model."""
    from gpt.adapter import adapt

    build_classifier(
        model,
        len(LABELS),
        args.trainable_blocks,
        args.train_final_norm,
        seed=args.seed,
        train_head=args.lora is None,
    )
    if args.lora is not None:
        adapt(model, args.lora, base_dir=base_dir, seed=args.seed, freeze=False)
    return model


def finetune_classifier(
    base_checkpoint_dir: Path,
    splits: Splits,
    args: SpamArgs | None = None,
    *,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    device: str = "auto",
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Finetune a spam classifier from an LM checkpoint on ``splits``
    (``{"train": (texts, labels), "validation": ..., "test": ...}``, ham=0/spam=1).

    Emits metrics rows ``{step, epoch, seen, split, name, value}`` through
    ``on_metrics`` (per-epoch ``loss``/``accuracy`` per split, then ``final_*`` rows),
    saves a classifier checkpoint to ``out_dir`` and returns a JSON-able summary.

    The summary's ``predictions`` lists, per split and message, the final model's
    ``{split, example_id, label, prediction, prob_spam}`` (``example_id`` = the message's
    index in its split; labels ``ham``/``spam``), as
    :func:`gpt.eval.baseline.prediction_rows` builds them.
    """
    if asks_torchrun(args):  # the same call on the processes args.distributed asks for
        return relaunch(finetune_classifier, locals())
    from gpt.checkpoint import load_checkpoint, save_checkpoint, weights_sha256
    from gpt.tokenizer import Tokenizer

    args = args or SpamArgs()
    _check_splits(splits)
    gd.require_divisible(args.batch_size, "finetune_spam.batch_size")
    if gd.strategy() == "fsdp":
        raise ConfigError(
            "the spam finetune supports distributed.strategy 'ddp' only (it trains a small "
            "suffix; the frozen prefix runs outside the model's forward); use 'ddp'"
        )
    timings: dict[str, float] = {}
    all_rows: list[dict[str, Any]] = []

    def emit(rows: list[dict[str, Any]]) -> None:
        all_rows.extend(rows)
        if on_metrics is not None and rows and gd.is_main():
            on_metrics(rows)

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    loaded = load_checkpoint(Path(base_checkpoint_dir))
    model = loaded.model
    tok_dir = tokenizer_dir or loaded.tokenizer_dir
    tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir else Tokenizer.gpt2()
    device = resolve_device(device)
    cfg = model.cfg
    if args.trainable_blocks > cfg.n_layers:
        raise ConfigError(
            f"trainable_blocks={args.trainable_blocks} but the base model in "
            f"{base_checkpoint_dir} has only {cfg.n_layers} blocks"
        )
    model.cfg = cfg.replace(drop_rate=args.drop_rate)
    set_dropout(model, args.drop_rate)
    prepare_classifier(model, args, base_dir=Path(base_checkpoint_dir))
    n_frozen = n_frozen_blocks(model)
    model.to(device)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    longest = max(len(tokenizer.encode(t)) for t in splits["train"][0])
    max_length = args.max_length or longest
    if max_length > cfg.context_length:
        # a max_length the user set is worth a warning; the default (the longest message,
        # capped at the context: documented) is not
        report = log.warning if args.max_length else log.info
        report(
            "%s %d exceeds the context length %d: truncating messages to %d tokens",
            "max_length" if args.max_length else "the longest training message, at",
            max_length,
            cfg.context_length,
            cfg.context_length,
        )
        max_length = cfg.context_length
    datasets: dict[str, SplitData] = {}
    for name, (texts, labels) in splits.items():
        datasets[name] = SplitData(
            ids=encode_spam(texts, tokenizer, max_length),
            labels=torch.tensor(labels, dtype=torch.long),
            last=last_real_index(texts, tokenizer, max_length)
            if args.pool == "last_real"
            else None,
        )
    timings["tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.prefix_cache:
        set_modes(model, n_frozen, train=False)
        for data in datasets.values():
            data.cache = build_cache(model, data, n_frozen, args.cache_chunk, device)
    timings["prefix_cache_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    losses, step, seen, eval_s = train_loop(
        model, datasets["train"], datasets, args, n_frozen, device, emit, progress
    )
    timings["train_s"] = time.perf_counter() - t0 - eval_s
    timings["eval_s"] = eval_s

    t0 = time.perf_counter()
    final: dict[str, dict[str, float | int]] = {}
    predictions: list[dict[str, Any]] = []
    for split, data in datasets.items():
        _, preds, probs = evaluate(model, data, n_frozen, args.cache_chunk, device)
        m = binary_metrics(data.labels.tolist(), preds)
        final[split] = m
        predictions += prediction_rows(split, data.labels.tolist(), preds, probs)
        emit([metric_row(step, args.epochs, seen, split, f"final_{k}", v) for k, v in m.items()])
    timings["final_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.cpu()
    # the settings that shaped the model (how it ran — processes, checkpoints — is no part)
    hparams = {**args.key_dict(), "max_length": max_length, "n_frozen_blocks": n_frozen}
    classifier_meta = {
        "kind": "classifier",
        "labels": list(LABELS),
        "num_classes": len(LABELS),
        "max_length": max_length,
        "pool": args.pool,
        "base_weights_sha256": weights_sha256(base_checkpoint_dir),
    }
    if gd.is_main():
        save_checkpoint(
            Path(out_dir),
            model,
            hparams=hparams,
            tokenizer_dir=Path(tok_dir) if tok_dir else None,
            meta=classifier_meta,
        )
    gd.barrier()
    release_free_memory()  # what gpt.heap's malloc settings kept while training
    timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    size = model_size(model, Path(out_dir), Path(base_checkpoint_dir), args.lora)
    emit([metric_row(step, args.epochs, seen, "train", k, v) for k, v in size.metrics().items()])
    return {
        "checkpoint": str(out_dir),
        "max_length": max_length,
        "n_frozen_blocks": n_frozen,
        "trainable_params": size.trainable_params,
        "model_size": size.to_dict(),
        "steps": step,
        "examples_seen": seen,
        "step_losses": losses,
        "final": final,
        "predictions": predictions,
        "timings": timings,
        "args": args.to_dict(),
        "device": str(device),
    }


def train_loop(
    model: nn.Module,
    train: SplitData,
    evals: dict[str, SplitData],
    args: SpamArgs,
    n_frozen: int,
    device: torch.device,
    emit: Callable[[list[dict[str, Any]]], None],
    progress: bool,
) -> tuple[list[float], int, int, float]:
    """Shared training loop (cached or full forward). Returns per-step losses, the last
    step, examples seen and the seconds spent evaluating."""
    from tqdm.auto import tqdm

    world = gd.world_size()
    step_module: nn.Module = StepModule(model, n_frozen)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=args.lr, weight_decay=args.weight_decay)  # fused where available
    order_gen = torch.Generator().manual_seed(args.seed)
    n = train.ids.shape[0]
    n_batches = n // args.batch_size if args.drop_last else math.ceil(n / args.batch_size)
    if n_batches == 0:
        raise DataError(
            f"training split has {n} messages, fewer than one batch of {args.batch_size}"
        )
    step, seen, eval_s = 0, 0, 0.0
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + gd.rank())  # dropout masks differ per rank
        for epoch in range(1, args.epochs + 1):
            set_modes(model, n_frozen, train=True)
            perm = torch.randperm(n, generator=order_gen)
            bar = tqdm(
                range(n_batches),
                desc=f"spam epoch {epoch}",
                disable=not progress or not gd.is_main(),
            )
            for b in bar:
                index = perm[b * args.batch_size : (b + 1) * args.batch_size]
                opt.zero_grad(set_to_none=True)
                if world == 1:
                    logits = batch_logits(model, train, index, n_frozen, device)
                    loss = F.cross_entropy(logits, train.labels[index].to(device))
                    loss.backward()
                    step_loss = loss.item()
                else:
                    step_loss = sharded_backward(step_module, train, index, device)
                opt.step()
                step += 1
                seen += len(index)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if args.log_every and step % args.log_every == 0:
                    emit([metric_row(step, epoch, seen, "train", "step_loss", losses[-1])])
            if args.eval_per_epoch or epoch == args.epochs:
                t0 = time.perf_counter()
                rows = []
                for split, data in evals.items():
                    loss_v, preds, _ = evaluate(model, data, n_frozen, args.cache_chunk, device)
                    acc = binary_metrics(data.labels.tolist(), preds)["accuracy"]
                    rows += [
                        metric_row(step, epoch, seen, split, "loss", loss_v),
                        metric_row(step, epoch, seen, split, "accuracy", acc),
                    ]
                    log.info("epoch %d %s loss %.4f accuracy %.4f", epoch, split, loss_v, acc)
                emit(rows)
                eval_s += time.perf_counter() - t0
    return losses, step, seen, eval_s


def metric_row(step: int, epoch: int, seen: int, split: str, name: str, value: float) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "seen": seen,
        "split": split,
        "name": name,
        "value": float(value),
    }
