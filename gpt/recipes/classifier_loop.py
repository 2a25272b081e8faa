"""The epochs of :func:`gpt.recipes.classifier.finetune_classifier`: the frozen prefix's
activations cached once per split, batches through the trainable suffix (or the whole
model when nothing is frozen), evaluation of whole splits, and under a process group
each rank's shard of every global batch with the gradient of the global batch's mean.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt import distributed as gd
from gpt.errors import DataError
from gpt.lm_step import adamw
from gpt.recipes.classifier_model import pool, prefix_hidden, set_modes, suffix_logits

if TYPE_CHECKING:
    from gpt.recipes.classifier import SpamArgs

log = logging.getLogger("gpt.recipes.classifier")


@dataclass
class SplitData:
    ids: torch.Tensor  # [N, T] long
    labels: torch.Tensor  # [N] long
    last: torch.Tensor | None  # [N] long (pool last_real) or None
    cache: torch.Tensor | None = None  # [N, T, D] prefix activations


def build_cache(
    model: nn.Module, data: SplitData, n_frozen: int, chunk: int, device: torch.device
) -> torch.Tensor:
    """Prefix activations of every row (under a process group: each rank computes its
    contiguous shard of the rows, then the shards are gathered)."""
    ids = gd.shard(data.ids)
    dtype = model.tok_emb.weight.dtype
    parts = [torch.empty((0, ids.shape[1], model.cfg.emb_dim), device=device, dtype=dtype)]
    with torch.no_grad():
        for s in range(0, ids.shape[0], chunk):
            parts.append(prefix_hidden(model, ids[s : s + chunk].to(device), n_frozen))
    return gd.all_gather_rows(torch.cat(parts))


def batch_logits(
    model: nn.Module, data: SplitData, index: torch.Tensor, n_frozen: int, device: torch.device
) -> torch.Tensor:
    """Pooled class logits [B, C] for the rows ``index`` of a split."""
    last = data.last[index].to(device) if data.last is not None else None
    if data.cache is not None:
        return suffix_logits(model, data.cache[index], n_frozen, last)
    return pool(model(data.ids[index].to(device)), last)


def evaluate(
    model: nn.Module, data: SplitData, n_frozen: int, chunk: int, device: torch.device
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
            logits = batch_logits(model, data, index, n_frozen, device)
            labels = data.labels[index].to(device)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            p = torch.softmax(logits.float(), dim=-1)
            preds += logits.argmax(-1).tolist()
            probs += p[:, 1].tolist()
    set_modes(model, n_frozen, train=was_training)
    if gd.is_distributed():
        parts = gd.all_gather_objects((total, preds, probs))
        total = sum(p[0] for p in parts)
        preds = [x for p in parts for x in p[1]]
        probs = [x for p in parts for x in p[2]]
    return total / n, preds, probs


class StepModule(nn.Module):
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
            return suffix_logits(self.model, inputs, self.n_frozen, last)
        return pool(self.model(inputs), last)


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
                    acc = accuracy(preds, data.labels.tolist())
                    rows += [
                        metric_row(step, epoch, seen, split, "loss", loss_v),
                        metric_row(step, epoch, seen, split, "accuracy", acc),
                    ]
                    log.info("epoch %d %s loss %.4f accuracy %.4f", epoch, split, loss_v, acc)
                emit(rows)
                eval_s += time.perf_counter() - t0
    return losses, step, seen, eval_s


def sharded_backward(
    step_module: nn.Module, data: SplitData, index: torch.Tensor, device: torch.device
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


def accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / max(len(labels), 1)


def metric_row(step: int, epoch: int, seen: int, split: str, name: str, value: float) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "seen": seen,
        "split": split,
        "name": name,
        "value": float(value),
    }
