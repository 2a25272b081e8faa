"""The parts of one language-model training step, shared by :func:`gpt.train.train_lm`,
the distributed loop and the benchmarks: the loss, evaluation and perplexity over a
loader, the learning-rate schedule, AdamW (fused where available) and one optimizer step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import ConfigError

if TYPE_CHECKING:
    from gpt.train import LMTrainArgs

log = logging.getLogger("gpt.train")


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all positions (targets ``-100`` ignored)."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> float:
    """Average of per-batch mean losses over the first ``max_batches`` batches (all when
    None), in eval mode; NaN for an empty loader. The training flag is restored."""
    n = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if n == 0:
        return float("nan")
    limit = n if max_batches is None else (max_batches if n is None else min(max_batches, n))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            total += lm_loss(model, x.to(device), y.to(device)).item()
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def perplexity(model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> float:
    """exp of the token-weighted mean next-token loss over the loader (NaN when empty)."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        nll, tokens = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            nll += F.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
            ).item()
            tokens += int((y != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(nll / tokens) if tokens else float("nan")


def lr_at(step: int, args: LMTrainArgs, total_steps: int) -> float:
    """Learning rate of the 0-based optimizer step ``step``.

    Warmup (steps ``< warmup_steps``): ``start + step · (lr - start) / warmup_steps`` with
    ``start = min(warmup_start_lr, lr)``. Then, with ``cosine``,
    ``min_lr + (lr - min_lr) · ½ · (1 + cos(π · p))`` where
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1];
    otherwise ``lr``.
    """
    if args.warmup_steps > 0 and step < args.warmup_steps:
        start = min(args.warmup_start_lr, args.lr)
        return start + step * (args.lr - start) / args.warmup_steps
    if not args.cosine:
        return args.lr
    span = max(total_steps - args.warmup_steps, 1)
    p = min(max((step - args.warmup_steps) / span, 0.0), 1.0)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def adamw(
    params: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``params``, with torch's fused kernel when ``fused`` is None and this torch
    has it for the parameters' device (True: require it, False: the plain per-tensor
    implementation). The fused kernel computes the same update in one pass over each
    tensor instead of about ten (3x faster on a CPU); its float rounding differs from the
    plain one's by about one unit in the last place of some elements."""
    if fused is False:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        if fused:
            raise ConfigError(f"fused AdamW requested but unavailable here: {exc}") from exc
        log.info("fused AdamW unavailable (%s); using the default implementation", exc)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(model: nn.Module, args: LMTrainArgs) -> torch.optim.AdamW:
    """:func:`adamw` over the trainable parameters (fused kernel per ``args.fused``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    return adamw(params, args.lr, args.weight_decay, args.fused)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float | None = None,
    grad_clip: float | None = None,
) -> tuple[float, float | None]:
    """One optimizer step; returns ``(loss, grad_norm)`` where ``grad_norm`` is the global
    gradient norm before clipping (None when not clipping). Gradients are left in
    ``.grad`` (clipped) until the next step zeroes them."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, inputs, targets)
    loss.backward()
    norm = None
    if grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    return float(loss.detach()), norm
