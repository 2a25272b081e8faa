"""The classifier's model side: a GPT with a class head, a frozen prefix and a trained
suffix.

:func:`build_classifier` turns a GPT into the reference's classifier (a fresh
``Linear(emb, classes)`` head, everything frozen but the last blocks, the final norm and
the head). The frozen prefix (:func:`prefix_hidden`) runs once per message when its
output is cached; :func:`suffix_logits` runs the trained blocks on cached hidden states
and, without active dropout, the last block at the pooled position only
(:func:`block_at`): the same outputs and gradients for a fraction of the work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import ConfigError
from gpt.lora import has_lora, linear_rows, lora_modules


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
