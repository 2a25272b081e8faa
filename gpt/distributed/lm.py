"""The data-parallel language-model step and evaluation :func:`gpt.train.train_lm` runs
under a process group: each rank takes its contiguous shard of every global batch, and
the loss is token-weighted over the global batch (the per-token loss sum of a shard
divided by the global count of non-ignored targets), so the numbers equal one
process's up to float rounding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt.distributed.context import all_reduce_sum, shard, world_size

__all__ = ["IGNORE_INDEX", "evaluate_lm_sharded", "lm_step_sharded"]

IGNORE_INDEX = -100
"""Targets with this value are left out of the loss (as ``F.cross_entropy`` does)."""


@torch.no_grad()
def evaluate_lm_sharded(
    module: nn.Module, loader: Any, max_batches: int, device: torch.device
) -> float:
    """:func:`gpt.lm_step.evaluate_lm` under a process group: every rank iterates the same batches
    (so shuffling generators advance alike), runs its shard of each and the per-batch
    loss sums are all-reduced; the result is the average of per-batch mean losses."""
    n = len(loader)
    if n == 0:
        return float("nan")
    limit = min(max_batches, n)
    was_training = module.training
    module.eval()
    sums, counts = [], []
    try:
        for i, (x, y) in enumerate(loader):
            if i >= limit:
                break
            counts.append(int((y != IGNORE_INDEX).sum()))
            xs, ys = shard(x).to(device), shard(y).to(device)
            logits = module(xs)
            sums.append(
                F.cross_entropy(logits.flatten(0, 1).float(), ys.flatten(), reduction="sum")
            )
    finally:
        module.train(was_training)
    total = all_reduce_sum(torch.stack(sums).double())
    means = [float(s) / c if c else float("nan") for s, c in zip(total, counts, strict=True)]
    return sum(means) / len(means)


def lm_step_sharded(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    *,
    lr: float,
    grad_clip: float | None,
) -> float:
    """One data-parallel optimizer step on this rank's shard of a global batch; returns
    the global batch's loss (token-weighted mean, as a single process computes it)."""
    world = world_size()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    count = int((targets != IGNORE_INDEX).sum())
    xs, ys = shard(inputs).to(device), shard(targets).to(device)
    logits = module(xs)
    total = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum")
    # DDP/FSDP average the ranks' gradients: scale so that average is d(sum / count)
    (total * (world / max(count, 1))).backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    loss = all_reduce_sum(total.detach().reshape(1).double())
    return float(loss) / count if count else float("nan")
