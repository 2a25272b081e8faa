"""The spam classifier as a model: a GPT with a class head, a frozen prefix and a
trained suffix; its messages as token ids; and what a split of messages goes through.

:func:`build_classifier` turns a GPT into the reference's classifier (a fresh
``Linear(emb, classes)`` head, everything frozen but the last blocks, the final norm and
the head). The frozen prefix (:func:`prefix_hidden`) runs once per message when its
output is cached (:func:`build_cache`); :func:`suffix_logits` runs the trained blocks on
cached hidden states and, without active dropout, the last block at the pooled position
only (:func:`block_at`): the same outputs and gradients for a fraction of the work.
:func:`evaluate` scores a whole split and :func:`sharded_backward` takes one rank's
share of a step under a process group; :func:`classify` labels texts with a saved
classifier. Labels: ham = 0, spam = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt import distributed as gd
from gpt.errors import CheckpointError, ConfigError
from gpt.lora import has_lora, linear_rows, lora_modules

LABELS = ["ham", "spam"]
PAD_ID = 50256


def set_dropout(module: nn.Module, p: float) -> None:
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
    train_head: bool = True,
) -> nn.Module:
    """Turn a GPT into a classifier in place: a fresh seeded ``Linear(emb, num_classes)``
    head, everything frozen except the last ``trainable_blocks`` blocks, the final norm
    (if ``train_final_norm``) and the head (if ``train_head``; a LoRA finetune keeps it
    frozen and adapts it). Returns the model."""
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
        p.requires_grad_(train_head)
    return base_model


def n_frozen_blocks(model: nn.Module) -> int:
    """How many leading blocks receive no gradient (their output is a fixed function of
    the input ids: :func:`prefix_hidden` may run them once and cache it)."""
    n = 0
    for block in model.blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        n += 1
    return n


def prefix_hidden(model: nn.Module, idx: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """Hidden states after the embeddings and the first ``n_frozen`` blocks."""
    x = model.embed(idx)
    for i, block in enumerate(list(model.blocks)[:n_frozen]):
        x = block(x, layer=i)
    return x


def suffix_logits(
    model: nn.Module, x: torch.Tensor, n_frozen: int, last_index: torch.Tensor | None
) -> torch.Tensor:
    """Pooled class logits [B, C] from hidden states [B, T, D] after the frozen prefix.
    Only the pooled position's output is needed, so without active dropout the last block
    runs at that position alone (:func:`block_at`); the blocks before it, and the last
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
    if last is not None and last.training and _dropout_active(last):
        last = None
    for i, block in enumerate(blocks[: -1 if last is not None else None], start=n_frozen):
        x = block(x, layer=i)
    h = block_at(last, x, where) if last is not None else x[torch.arange(b, device=x.device), where]
    return model.out_head(model.final_norm(h))


def _dropout_active(block: nn.Module) -> bool:
    """Whether a training-mode block draws dropout masks (its own or its adapters')."""
    lora = any(getattr(m, "dropout", 0.0) for m in lora_modules(block).values())
    return block.att.drop_rate > 0 or lora


def block_at(block: nn.Module, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A transformer block's output [B, D] at position ``where[r]`` of each row ``r`` only:
    the numbers of ``block(x)[r, where[r]]`` (causal attention reads the keys and values
    of positions 0..p for position p; LayerNorm and the MLP work per position) at a
    fraction of the cost — one query instead of T, and the projections, MLP and residuals
    at one position. Keys and values are still computed at every position."""
    att = block.att
    b, t, d = x.shape
    rows = torch.arange(b, device=x.device)
    h = block.norm1(x)
    if has_lora(att.qkv):
        q = linear_rows(att.qkv, h[rows, where], 0, d)
        kv = linear_rows(att.qkv, h, d, 3 * d)
    else:
        # split (not slicing): backward concatenates the two gradients in one pass instead
        # of zero-filling a full-size buffer per slice and adding them up
        w_q, w_kv = att.qkv.weight.split([d, 2 * d])
        b_q, b_kv = (None, None) if att.qkv.bias is None else att.qkv.bias.split([d, 2 * d])
        q = F.linear(h[rows, where], w_q, b_q)
        kv = F.linear(h, w_kv, b_kv)
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


def pool(logits: torch.Tensor, last_index: torch.Tensor | None) -> torch.Tensor:
    """[B, T, C] -> [B, C] at the last position or at per-row ``last_index``."""
    if last_index is None:
        return logits[:, -1, :]
    return logits[torch.arange(logits.shape[0], device=logits.device), last_index]


def set_modes(model: nn.Module, n_frozen: int, train: bool) -> None:
    """Frozen prefix always in eval mode (no dropout); the suffix in ``train`` mode."""
    model.train(train)
    for m in (model.tok_emb, model.pos_emb, model.drop_emb, *list(model.blocks)[:n_frozen]):
        m.eval()


# --------------------------------------------------------------------------- messages


def encode_spam(texts: Sequence[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """Token ids [N, max_length]: each text encoded, truncated to ``max_length`` and
    right-padded with 50256."""
    out = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[:max_length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def last_real_index(texts: Sequence[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    lens = [min(len(tokenizer.encode(t)), max_length) for t in texts]
    return torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.long)


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
    from gpt.tokenizer import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    loaded = load_checkpoint(checkpoint_dir)
    info = _classifier_info(loaded, checkpoint_dir)
    tok_dir = loaded.tokenizer_dir
    tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir else Tokenizer.gpt2()
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
                last_real_index(chunk, tokenizer, max_length)
                if info["pool"] == "last_real"
                else None
            )
            probs = torch.softmax(pool(model(ids), last).float(), dim=-1)
            for row in probs:
                k = int(row.argmax())
                out.append((labels[k], float(row[1])))
    return out


# --------------------------------------------------------------------------- splits


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
