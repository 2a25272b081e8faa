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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from gpt import distributed as gd
from gpt.adapter import model_size
from gpt.config import Args, operational
from gpt.device import resolve_device
from gpt.distributed.launch import launchable
from gpt.distributed.settings import DistributedArgs
from gpt.errors import CheckpointError, ConfigError, DataError
from gpt.heap import release_free_memory
from gpt.lora import LoraSetting
from gpt.recipes.classifier_loop import (
    SplitData,
    build_cache,
    evaluate,
    metric_row,
    train_loop,
)
from gpt.recipes.classifier_model import (
    build_classifier,
    n_frozen_blocks,
    pool,
    set_dropout,
    set_modes,
)

log = logging.getLogger(__name__)

LABELS = ["ham", "spam"]
PAD_ID = 50256
Splits = dict[str, tuple[list[str], list[int]]]
MetricsCallback = Callable[[list[dict[str, Any]]], None]


class SpamArgs(Args):
    """Settings of the spam-classifier finetune (defaults: the reference recipe)."""

    trainable_blocks: int = Field(1, ge=0)
    """How many of the last transformer blocks are trained (the rest stay frozen).
    Default 1, or 0 with ``lora``."""
    train_final_norm: bool = True
    """Also train the final LayerNorm (the reference does). Default true, or false with
    ``lora``."""
    lora: LoraSetting = None
    """Low-rank adaptation instead of training weights outright (None = off): every base
    weight and the new head are frozen, adapters train (:class:`~gpt.lora.LoraArgs`).
    The book's setting (appendix E) is ``lora = true``: rank 16, alpha 16, every linear
    layer including the class head — 2,666,528 trainable parameters on GPT-2 124M.
    ``trainable_blocks`` / ``train_final_norm``, when set too, still train those weights
    outright beside the adapters."""
    epochs: int = Field(5, ge=1)
    """Passes over the training split."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(8, ge=1)
    """Messages per optimizer step."""
    seed: int = 123
    """Seed of the head's initialisation, the batch order and dropout."""
    max_length: int | None = Field(None, ge=1)
    """Pad/truncate every message to this many tokens; None = the longest training
    message (capped at the model's context length)."""
    pool: Literal["last", "last_real"] = "last"
    """Which position's logits classify a message: ``last`` = the last position of the
    padded sequence (the reference), ``last_real`` = the message's last real token."""
    prefix_cache: bool = True
    """Compute the frozen prefix's activations once per split (True) or run the full
    model every step (False); both give the same losses."""
    eval_per_epoch: bool = True
    """Score loss and accuracy on every split after each epoch."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """Dropout in the trainable blocks (the frozen prefix never uses dropout)."""
    drop_last: bool = True
    """Drop the last incomplete training batch (as the reference's loader does)."""
    cache_chunk: int = Field(64, ge=1)
    """Messages per forward pass while building the prefix cache / evaluating."""
    log_every: int = Field(0, ge=0)
    """Emit a ``step_loss`` metrics row every this many steps (0 = never)."""
    distributed: DistributedArgs = operational(default_factory=DistributedArgs)
    """How many processes train (``nproc = 1``: the calling process; more: under
    torchrun with DDP — ``strategy = "fsdp"`` is refused here, see
    :class:`~gpt.distributed.DistributedArgs`). ``batch_size`` stays the global batch
    and must split evenly over the processes. :func:`finetune_classifier` launches
    itself on this layout (:func:`gpt.distributed.launch.launchable`).
    Operational: with ``drop_rate = 0`` (the default), N processes give the per-step
    losses, weights and predictions of 1 process within ~1e-5 (float rounding), so the
    layout is not part of the cache key; with dropout, another layout gives an equally
    valid but different sample, served from the same cache entry."""

    @model_validator(mode="before")
    @classmethod
    def _lora_defaults(cls, data: Any) -> Any:
        """With ``lora`` on, nothing but the adapters trains unless asked."""
        if isinstance(data, dict) and data.get("lora") not in (None, False):
            data = {"trainable_blocks": 0, "train_final_norm": False, **data}
        return data

    @field_validator("distributed")
    @classmethod
    def _distributed_layout(cls, v: DistributedArgs, info: ValidationInfo) -> DistributedArgs:
        if "batch_size" in info.data:  # else batch_size itself was invalid
            v.check_batch(info.data["batch_size"], "batch_size")
        if v.strategy != "ddp":
            raise ValueError(
                f"strategy={v.strategy!r}: the spam finetune supports 'ddp' only (it trains "
                "a small suffix of the model)"
            )
        return v


# --------------------------------------------------------------------------- data


def encode_spam(texts: Sequence[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """Token ids [N, max_length]: each text encoded, truncated to ``max_length`` and
    right-padded with 50256."""
    out = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[:max_length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _last_real_index(texts: Sequence[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    lens = [min(len(tokenizer.encode(t)), max_length) for t in texts]
    return torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.long)


def _check_splits(splits: Splits) -> None:
    if "train" not in splits:
        raise DataError(f"spam splits have no 'train' split (have {sorted(splits)})")
    for name, (texts, labels) in splits.items():
        if len(texts) != len(labels):
            raise DataError(f"spam split {name!r}: {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise DataError(f"spam split {name!r} is empty")
        bad = sorted({y for y in labels if y not in (0, 1)})
        if bad:
            raise DataError(f"spam split {name!r}: labels must be 0 (ham) / 1 (spam), got {bad}")


def _load_tokenizer(tokenizer_dir: Path | None) -> Any:
    from gpt.tokenizer import Tokenizer

    if tokenizer_dir is not None:
        return Tokenizer.from_dir(tokenizer_dir)
    return Tokenizer.gpt2()


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


@launchable
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
    from gpt.checkpoint import load_checkpoint, save_checkpoint, weights_sha256
    from gpt.eval.baseline import binary_metrics, prediction_rows

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
    tokenizer = _load_tokenizer(Path(tok_dir) if tok_dir else None)
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
            last=_last_real_index(texts, tokenizer, max_length)
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
        "prefix_cache_build_s": timings["prefix_cache_s"],
        "args": args.to_dict(),
        "device": str(device),
    }


# --------------------------------------------------------------------------- inference


def _classifier_info(loaded: Any, checkpoint_dir: Path) -> dict[str, Any]:
    meta = dict(getattr(loaded, "meta", None) or {})
    hparams = dict(getattr(loaded, "hparams", None) or {})
    kind = getattr(loaded, "kind", None) or meta.get("kind")
    if kind != "classifier":
        raise CheckpointError(
            f"{checkpoint_dir} holds a {kind!r} checkpoint, not a spam classifier: pass a "
            "folder written by the finetune_spam stage"
        )
    max_length = meta.get("max_length") or hparams.get("max_length")
    if not max_length:
        raise CheckpointError(
            f"{checkpoint_dir}: classifier checkpoint records no max_length "
            f"(meta / hparams.json); re-run the finetune_spam stage"
        )
    return {
        "labels": list(getattr(loaded, "labels", None) or meta.get("labels") or LABELS),
        "max_length": int(max_length),
        "pool": meta.get("pool") or hparams.get("pool") or "last",
    }


def classify(
    checkpoint_dir: Path, texts: Sequence[str], *, batch_size: int = 32
) -> list[tuple[str, float]]:
    """``(label, probability of spam)`` for each text, with a classifier checkpoint."""
    from gpt.checkpoint import load_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    loaded = load_checkpoint(checkpoint_dir)
    info = _classifier_info(loaded, checkpoint_dir)
    tok_dir = loaded.tokenizer_dir
    tokenizer = _load_tokenizer(Path(tok_dir) if tok_dir else None)
    model = loaded.model
    model.eval()
    max_length = min(info["max_length"], model.cfg.context_length)
    labels = info["labels"]
    out: list[tuple[str, float]] = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            chunk = list(texts[s : s + batch_size])
            ids = encode_spam(chunk, tokenizer, max_length)
            last = (
                _last_real_index(chunk, tokenizer, max_length)
                if info["pool"] == "last_real"
                else None
            )
            probs = torch.softmax(pool(model(ids), last).float(), dim=-1)
            for row in probs:
                k = int(row.argmax())
                out.append((labels[k], float(row[1])))
    return out
