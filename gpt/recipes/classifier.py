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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from gpt import distributed as gd
from gpt.config import Args, operational
from gpt.device import resolve_device
from gpt.distributed.settings import DistributedArgs
from gpt.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

LABELS = ["ham", "spam"]
PAD_ID = 50256
Splits = dict[str, tuple[list[str], list[int]]]
MetricsCallback = Callable[[list[dict[str, Any]]], None]


class SpamArgs(Args):
    """Settings of the spam-classifier finetune (defaults: the reference recipe)."""

    trainable_blocks: int = Field(1, ge=0)
    """How many of the last transformer blocks are trained (the rest stay frozen)."""
    train_final_norm: bool = True
    """Also train the final LayerNorm (the reference does)."""
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
    """How many processes train (``nproc = 1``: the calling process, as before; more:
    under torchrun with DDP — ``strategy = "fsdp"`` is refused here, see
    :class:`~gpt.distributed.DistributedArgs`). ``batch_size`` stays the global batch
    and must split evenly over the processes. Read by the caller that launches the
    training (the pipeline's stage, through :func:`gpt.distributed.run_distributed`).
    Operational: with ``drop_rate = 0`` (the default), N processes give the per-step
    losses, weights and predictions of 1 process within ~1e-5 (float rounding), so the
    layout is not part of the cache key; with dropout, another layout gives an equally
    valid but different sample, served from the same cache entry."""

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


# --------------------------------------------------------------------------- model


def _set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout probability inside ``module`` (incl. the fused SDPA one)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float):
            m.drop_rate = p


def build_classifier(
    base_model: nn.Module,
    num_classes: int = 2,
    trainable_blocks: int = 1,
    train_final_norm: bool = True,
    *,
    seed: int = 123,
) -> nn.Module:
    """Turn a GPT into a classifier in place: a fresh seeded ``Linear(emb, num_classes)``
    head, everything frozen except the last ``trainable_blocks`` blocks, the final norm
    (if ``train_final_norm``) and the head. Returns the model."""
    n_layers = len(base_model.blocks)
    if trainable_blocks > n_layers:
        raise ConfigError(
            f"trainable_blocks={trainable_blocks} but the model has only {n_layers} blocks"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base_model.replace_head(num_classes)
    for p in base_model.parameters():
        p.requires_grad_(False)
    for block in list(base_model.blocks)[n_layers - trainable_blocks :]:
        for p in block.parameters():
            p.requires_grad_(True)
    if train_final_norm:
        for p in base_model.final_norm.parameters():
            p.requires_grad_(True)
    for p in base_model.out_head.parameters():
        p.requires_grad_(True)
    return base_model


def _n_frozen(model: nn.Module, trainable_blocks: int) -> int:
    return len(model.blocks) - trainable_blocks


def _prefix(model: nn.Module, idx: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """Hidden states after the embeddings and the first ``n_frozen`` blocks."""
    x = model.embed(idx)
    for i, block in enumerate(list(model.blocks)[:n_frozen]):
        x = block(x, layer=i)
    return x


def _suffix_logits(
    model: nn.Module, x: torch.Tensor, n_frozen: int, last_index: torch.Tensor | None
) -> torch.Tensor:
    """Pooled class logits [B, C] from hidden states [B, T, D] after the frozen prefix.
    Only the pooled position's output is needed, so without active dropout the last block
    runs at that position alone (:func:`_block_at`); the blocks before it, and the last
    one while dropout is on (its masks then match the full forward's draw for draw), run
    at every position."""
    b, t, _ = x.shape
    where = (
        last_index
        if last_index is not None
        else torch.full((b,), t - 1, dtype=torch.long, device=x.device)
    )
    blocks = list(model.blocks)[n_frozen:]
    last = blocks[-1] if blocks else None
    if last is not None and last.training and last.att.drop_rate > 0:
        last = None
    for i, block in enumerate(blocks[: -1 if last is not None else None], start=n_frozen):
        x = block(x, layer=i)
    if last is not None:
        h = _block_at(last, x, where)
    else:
        h = x[torch.arange(b, device=x.device), where]
    return model.out_head(model.final_norm(h))


def _block_at(block: nn.Module, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A transformer block's output [B, D] at position ``where[r]`` of each row ``r`` only:
    the numbers of ``block(x)[r, where[r]]`` (causal attention reads the keys and values
    of positions 0..p for position p; LayerNorm and the MLP work per position) at a
    fraction of the cost — one query instead of T, and the projections, MLP and residuals
    at one position. Keys and values are still computed at every position."""
    att = block.att
    b, t, d = x.shape
    rows = torch.arange(b, device=x.device)
    h = block.norm1(x)
    w, bias = att.qkv.weight, att.qkv.bias
    q = F.linear(h[rows, where], w[:d], None if bias is None else bias[:d])
    kv = F.linear(h, w[d:], None if bias is None else bias[d:])
    q = q.view(b, att.n_heads, 1, att.head_dim)
    kv = kv.view(b, t, 2, att.n_heads, att.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]  # [B, H, T, hd]
    visible = torch.arange(t, device=x.device)[None, :] <= where[:, None]  # causal, [B, T]
    mask = visible[:, None, None, :]
    p_drop = att.drop_rate if att.training else 0.0
    if att.attention == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
    else:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(att.head_dim))
        out = att.attn_drop(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)) @ v
    y = x[rows, where] + block.drop_shortcut(att.out_proj(out.reshape(b, d)))
    return y + block.drop_shortcut(block.ff(block.norm2(y)))


def _pool(logits: torch.Tensor, last_index: torch.Tensor | None) -> torch.Tensor:
    """[B, T, C] -> [B, C] at the last position or at per-row ``last_index``."""
    if last_index is None:
        return logits[:, -1, :]
    return logits[torch.arange(logits.shape[0], device=logits.device), last_index]


def _set_modes(model: nn.Module, n_frozen: int, train: bool) -> None:
    """Frozen prefix always in eval mode (no dropout); the suffix in ``train`` mode."""
    model.train(train)
    for m in (model.tok_emb, model.pos_emb, model.drop_emb, *list(model.blocks)[:n_frozen]):
        m.eval()


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


@dataclass
class _SplitData:
    ids: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N] long
    last: torch.Tensor | None  # [N] long (pool last_real) or None
    cache: torch.Tensor | None = None  # [N, T, D] prefix activations


def _build_cache(
    model: nn.Module, data: _SplitData, n_frozen: int, chunk: int, device: torch.device
) -> torch.Tensor:
    """Prefix activations of every row (under a process group: each rank computes its
    contiguous shard of the rows, then the shards are gathered)."""
    ids = gd.shard(data.ids)
    dtype = model.tok_emb.weight.dtype
    parts = [torch.empty((0, ids.shape[1], model.cfg.emb_dim), device=device, dtype=dtype)]
    with torch.no_grad():
        for s in range(0, ids.shape[0], chunk):
            parts.append(_prefix(model, ids[s : s + chunk].to(device), n_frozen))
    return gd.all_gather_rows(torch.cat(parts))


def _batch_logits(
    model: nn.Module, data: _SplitData, index: torch.Tensor, n_frozen: int, device: torch.device
) -> torch.Tensor:
    """Pooled class logits [B, C] for the rows ``index`` of a split."""
    last = data.last[index].to(device) if data.last is not None else None
    if data.cache is not None:
        return _suffix_logits(model, data.cache[index], n_frozen, last)
    return _pool(model(data.ids[index].to(device)), last)


def _evaluate(
    model: nn.Module, data: _SplitData, n_frozen: int, chunk: int, device: torch.device
) -> tuple[float, list[int], list[float]]:
    """Mean loss, predictions and spam probabilities over a whole split (under a
    process group: each rank scores its contiguous shard of the rows; the results are
    gathered in row order)."""
    was_training = model.training
    model.eval()
    total, preds, probs = 0.0, [], []
    n = data.ids.shape[0]
    rows = gd.shard(torch.arange(n))
    with torch.no_grad():
        for s in range(0, len(rows), chunk):
            index = rows[s : s + chunk]
            logits = _batch_logits(model, data, index, n_frozen, device)
            labels = data.labels[index].to(device)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            p = torch.softmax(logits.float(), dim=-1)
            preds += logits.argmax(-1).tolist()
            probs += p[:, 1].tolist()
    _set_modes(model, n_frozen, train=was_training)
    if gd.is_distributed():
        parts = gd.all_gather_objects((total, preds, probs))
        total = sum(p[0] for p in parts)
        preds = [x for p in parts for x in p[1]]
        probs = [x for p in parts for x in p[2]]
    return total / n, preds, probs


class _StepModule(nn.Module):
    """The training forward as one module (pooled logits of given rows), so DDP can
    wrap it: the loop calls the suffix directly when the prefix is cached."""

    def __init__(self, model: nn.Module, n_frozen: int) -> None:
        super().__init__()
        self.model = model
        self.n_frozen = n_frozen

    def forward(
        self, inputs: torch.Tensor, last: torch.Tensor | None, cached: bool
    ) -> torch.Tensor:
        if cached:
            return _suffix_logits(self.model, inputs, self.n_frozen, last)
        return _pool(self.model(inputs), last)


def _train_loop(
    model: nn.Module,
    train: _SplitData,
    evals: dict[str, _SplitData],
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
    step_module: nn.Module = _StepModule(model, n_frozen)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
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
            _set_modes(model, n_frozen, train=True)
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
                    logits = _batch_logits(model, train, index, n_frozen, device)
                    loss = F.cross_entropy(logits, train.labels[index].to(device))
                    loss.backward()
                    step_loss = loss.item()
                else:
                    step_loss = _sharded_backward(step_module, train, index, device)
                opt.step()
                step += 1
                seen += len(index)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if args.log_every and step % args.log_every == 0:
                    emit([_row(step, epoch, seen, "train", "step_loss", losses[-1])])
            if args.eval_per_epoch or epoch == args.epochs:
                t0 = time.perf_counter()
                rows = []
                for split, data in evals.items():
                    loss_v, preds, _ = _evaluate(model, data, n_frozen, args.cache_chunk, device)
                    acc = _accuracy(preds, data.labels.tolist())
                    rows += [
                        _row(step, epoch, seen, split, "loss", loss_v),
                        _row(step, epoch, seen, split, "accuracy", acc),
                    ]
                    log.info("epoch %d %s loss %.4f accuracy %.4f", epoch, split, loss_v, acc)
                emit(rows)
                eval_s += time.perf_counter() - t0
    return losses, step, seen, eval_s


def _sharded_backward(
    step_module: nn.Module, data: _SplitData, index: torch.Tensor, device: torch.device
) -> float:
    """Forward/backward of this rank's shard of the global batch ``index``, scaled so
    the ranks' averaged gradient is that of the global batch's mean loss; returns that
    mean loss."""
    world = gd.world_size()
    mine = gd.shard(index)
    cached = data.cache is not None
    inputs = data.cache[mine] if cached else data.ids[mine].to(device)  # type: ignore[index]
    last = data.last[mine].to(device) if data.last is not None else None
    logits = step_module(inputs, last, cached)
    total = F.cross_entropy(logits, data.labels[mine].to(device), reduction="sum")
    (total * (world / len(index))).backward()
    return float(gd.all_reduce_sum(total.detach().reshape(1).double())) / len(index)


def _accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / max(len(labels), 1)


def _row(step: int, epoch: int, seen: int, split: str, name: str, value: float) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "seen": seen,
        "split": split,
        "name": name,
        "value": float(value),
    }


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
    from gpt.checkpoint import load_checkpoint, save_checkpoint
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
    _set_dropout(model, args.drop_rate)
    n_frozen = _n_frozen(model, args.trainable_blocks)
    build_classifier(
        model, len(LABELS), args.trainable_blocks, args.train_final_norm, seed=args.seed
    )
    model.to(device)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    longest = max(len(tokenizer.encode(t)) for t in splits["train"][0])
    max_length = args.max_length or longest
    if max_length > cfg.context_length:
        log.warning(
            "max_length %d exceeds the context length %d: truncating",
            max_length,
            cfg.context_length,
        )
        max_length = cfg.context_length
    datasets: dict[str, _SplitData] = {}
    for name, (texts, labels) in splits.items():
        datasets[name] = _SplitData(
            ids=encode_spam(texts, tokenizer, max_length),
            labels=torch.tensor(labels, dtype=torch.long),
            last=_last_real_index(texts, tokenizer, max_length)
            if args.pool == "last_real"
            else None,
        )
    timings["tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.prefix_cache:
        _set_modes(model, n_frozen, train=False)
        for data in datasets.values():
            data.cache = _build_cache(model, data, n_frozen, args.cache_chunk, device)
    timings["prefix_cache_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    losses, step, seen, eval_s = _train_loop(
        model, datasets["train"], datasets, args, n_frozen, device, emit, progress
    )
    timings["train_s"] = time.perf_counter() - t0 - eval_s
    timings["eval_s"] = eval_s

    t0 = time.perf_counter()
    final: dict[str, dict[str, float | int]] = {}
    predictions: list[dict[str, Any]] = []
    for split, data in datasets.items():
        _, preds, probs = _evaluate(model, data, n_frozen, args.cache_chunk, device)
        m = binary_metrics(data.labels.tolist(), preds)
        final[split] = m
        predictions += prediction_rows(split, data.labels.tolist(), preds, probs)
        emit([_row(step, args.epochs, seen, split, f"final_{k}", v) for k, v in m.items()])
    timings["final_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.cpu()
    hparams = {**args.to_dict(), "max_length": max_length, "n_frozen_blocks": n_frozen}
    classifier_meta = {
        "kind": "classifier",
        "labels": list(LABELS),
        "num_classes": len(LABELS),
        "max_length": max_length,
        "pool": args.pool,
        "base_checkpoint": str(base_checkpoint_dir),
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
    timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "checkpoint": str(out_dir),
        "max_length": max_length,
        "n_frozen_blocks": n_frozen,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
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
            probs = torch.softmax(_pool(model(ids), last).float(), dim=-1)
            for row in probs:
                k = int(row.argmax())
                out.append((labels[k], float(row[1])))
    return out
