"""GPT-2 style decoder-only transformer (pre-LayerNorm blocks, causal multi-head
attention, tanh-GELU MLP, learned positions) with a KV cache for incremental decoding
and key-padding masks + per-row positions for batched, left-padded prompts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import ConfigError

__all__ = [
    "CONFIGS",
    "GPT",
    "FeedForward",
    "GPTConfig",
    "KVCache",
    "MultiHeadAttention",
    "TransformerBlock",
    "count_parameters",
    "get_config",
    "positions_from_mask",
]


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT model."""

    vocab_size: int = 50257
    """Number of token ids (GPT-2 BPE: 50,257)."""
    context_length: int = 1024
    """Largest number of positions the model can attend over (size of ``pos_emb``)."""
    emb_dim: int = 768
    """Width of the residual stream."""
    n_heads: int = 12
    """Attention heads per block; must divide ``emb_dim``."""
    n_layers: int = 12
    """Number of transformer blocks."""
    drop_rate: float = 0.1
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    qkv_bias: bool = False
    """Bias on the fused query/key/value projection (True for OpenAI's GPT-2)."""
    tie_weights: bool = True
    """Share the output head's weight with the token embedding (as GPT-2 does)."""
    attention: Literal["sdpa", "explicit"] = "sdpa"
    """``sdpa``: torch's fused scaled_dot_product_attention; ``explicit``: matmul + mask +
    softmax written out (same numbers, easier to inspect)."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon (variance is the biased one, as in GPT-2)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.attention not in ("sdpa", "explicit"):
            raise ConfigError(
                f"GPTConfig.attention must be 'sdpa' or 'explicit', got {self.attention!r}"
            )
        if not float(self.ln_eps) > 0:
            raise ConfigError(f"GPTConfig.ln_eps must be > 0, got {self.ln_eps!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the architecture fields."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**d)

    def replace(self, **kw: Any) -> GPTConfig:
        """A copy with some fields changed (unknown names raise :class:`ConfigError`)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **kw)


def _openai(emb: int, layers: int, heads: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=50257,
        context_length=1024,
        emb_dim=emb,
        n_heads=heads,
        n_layers=layers,
        drop_rate=0.0,
        qkv_bias=True,
        tie_weights=True,
    )


#: Named architectures. The ``gpt2-*`` entries match OpenAI's releases (QKV bias, tied
#: head, dropout 0.0 — set ``drop_rate`` when finetuning if wanted).
CONFIGS: dict[str, GPTConfig] = {
    "gpt2-small": _openai(768, 12, 12),
    "gpt2-medium": _openai(1024, 24, 16),
    "gpt2-large": _openai(1280, 36, 20),
    "gpt2-xl": _openai(1600, 48, 25),
    # The reference's from-scratch model: a separate (untied) output head, so its initial
    # loss is ~ln(50257) = 10.8 rather than the hundreds a tied default-init head gives.
    "gpt2-small-256": GPTConfig(
        context_length=256,
        emb_dim=768,
        n_heads=12,
        n_layers=12,
        drop_rate=0.1,
        qkv_bias=False,
        tie_weights=False,
    ),
    "tiny": GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, tie_weights=False),
    "mini": GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=4, tie_weights=False),
}
#: Aliases by OpenAI's release-folder names.
_ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """The named config from :data:`CONFIGS` (or an OpenAI size like ``124M``), with
    ``overrides`` applied."""
    key = _ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ConfigError(
            f"unknown model config {name!r}; choose one of {sorted(CONFIGS)} "
            f"(or an OpenAI size {sorted(_ALIASES)})"
        )
    cfg = CONFIGS[key]
    return cfg.replace(**overrides) if overrides else cfg


class KVCache:
    """Keys and values of the tokens processed so far, per layer, for incremental decoding.

    Buffers are allocated on first use with room for ``capacity`` positions (default: the
    model's context length); :attr:`length` counts the positions already stored. The
    model's forward appends the new keys/values of every layer, then advances
    :attr:`length` once.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.n_layers = n_layers
        self.capacity = capacity
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    @classmethod
    def for_model(cls, model: GPT, capacity: int | None = None) -> KVCache:
        """An empty cache sized for ``model``."""
        return cls(model.cfg.n_layers, capacity or model.cfg.context_length)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ([B, H, T, hd]) after the cached positions of ``layer`` and
        return all keys/values of that layer ([B, H, length + T, hd])."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {t} new > capacity {self.capacity}"
            )
        buf_k = self._k[layer]
        if buf_k is None or buf_k.shape[0] != k.shape[0]:
            if self.length:
                raise ValueError("KV cache batch size changed mid-sequence")
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            buf_k = k.new_empty(shape)
            self._k[layer] = buf_k
            self._v[layer] = v.new_empty(shape)
        buf_v = self._v[layer]
        assert buf_v is not None
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, t: int) -> None:
        """Mark ``t`` more positions as stored (called once per forward)."""
        self.length += t

    def reset(self) -> None:
        """Forget all cached positions (buffers are kept for reuse)."""
        self.length = 0


def positions_from_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """Per-row position ids from a key-padding mask (True = real token): the first real
    token of each row gets position 0, left padding gets 0 too."""
    return (attn_mask.long().cumsum(-1) - 1).clamp_(min=0)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.emb_dim = cfg.emb_dim
        self.attention = cfg.attention
        self.drop_rate = cfg.drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, D] -> [B, T, D]. ``attn_mask``: optional bool [B, S] key-padding mask
        over all S = cached + T positions (True = real token)."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # [B, H, T, hd] views, no copy; unbind (not indexing) so that backward stacks the
        # three gradients once instead of zero-filling and adding three full-size buffers
        q, k, v = qkv.unbind(0)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
        s = k.shape[2]
        mask = _build_mask(t, s, past, attn_mask, x.device)
        p_drop = self.drop_rate if self.training else 0.0
        if self.attention == "sdpa" and mask is None and t > 1 and _math_path_on_cpu(q, p_drop):
            out = causal_attention_cpu(q, k, v, p_drop)
        elif self.attention == "sdpa":
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=p_drop,
                is_causal=mask is None and t > 1,
            )
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is None and t > 1:
                mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril_(s - t)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = self.attn_drop(torch.softmax(scores, dim=-1))
            out = weights @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


def _math_path_on_cpu(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether ``F.scaled_dot_product_attention`` would run its composite "math" kernel
    here: on the CPU, float32, with dropout (the fused CPU flash kernel has no dropout)."""
    return dropout_p > 0.0 and q.device.type == "cpu" and q.dtype == torch.float32


def causal_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Causal attention with dropout on the attention weights, ``[B, H, T, hd]`` each:
    the same operations, in the same order and on the same random draws, as the
    composite kernel ``F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
    is_causal=True)`` runs on a CPU (q and k each scaled by the root of 1/sqrt(hd), the
    scores matmul, the additive causal mask, softmax, dropout, the values matmul), so
    outputs and gradients are bit for bit the same (``tests/test_model.py`` checks it).
    What it leaves out is the "safe" softmax's scan for fully masked rows, which a causal
    mask never has (every row sees itself)."""
    t = q.shape[-2]
    scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    above = torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1)
    mask = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill_(above, float("-inf"))
    scores = torch.matmul(q * scale, k.transpose(-2, -1) * scale)
    scores.add_(mask)
    weights = F.dropout(torch.softmax(scores, dim=-1), dropout_p, training=True)
    return torch.matmul(weights, v)


def _build_mask(
    t: int, s: int, past: int, attn_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool attention mask [B|1, 1, T, S] (True = may attend), or None when plain causal
    (``past == 0``) or nothing to mask (one query at the end of the cache)."""
    if attn_mask is None:
        if past == 0 or t == 1:
            return None
        return torch.ones(t, s, dtype=torch.bool, device=device).tril_(past)
    if attn_mask.shape[-1] != s:
        raise ValueError(f"attn_mask covers {attn_mask.shape[-1]} positions, expected {s}")
    causal = torch.ones(t, s, dtype=torch.bool, device=device).tril_(past)
    mask = causal & attn_mask[:, None, None, :].to(torch.bool)
    # A padding query would see no key at all (NaN softmax): let it see itself.
    diag = torch.zeros(t, s, dtype=torch.bool, device=device)
    diag[torch.arange(t, device=device), torch.arange(past, past + t, device=device)] = True
    return mask | diag


class FeedForward(nn.Module):
    """Position-wise MLP: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.fc2 = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(att(ln1(x))), then x + drop(ff(ln2(x)))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, layer, attn_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPT(nn.Module):
    """The GPT model: embeddings -> blocks -> final LayerNorm -> output head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    @property
    def is_tied(self) -> bool:
        """Whether the output head currently shares the token embedding's weight."""
        return self.out_head.weight is self.tok_emb.weight

    def replace_head(self, num_classes: int) -> nn.Linear:
        """Swap the LM head for a fresh ``Linear(emb_dim, num_classes)`` with bias (a
        classifier head; unties the weights). Returns the new head."""
        head = nn.Linear(self.cfg.emb_dim, num_classes)
        ref = self.tok_emb.weight
        head.to(device=ref.device, dtype=ref.dtype)
        self.out_head = head
        return head

    def embed(self, idx: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings (+ dropout) for ``idx`` [B, T]. ``pos`` is [T] or
        [B, T] position ids (default 0..T-1)."""
        t = idx.shape[1]
        if pos is None:
            pos = torch.arange(t, device=idx.device)
        return self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))

    def hidden(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, D] (everything but the head)."""
        t = idx.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {past + t} positions exceeds context_length "
                f"{self.cfg.context_length}; crop the input"
            )
        if pos is None:
            if attn_mask is not None:
                pos = positions_from_mask(attn_mask)[:, past:]
            else:
                pos = torch.arange(past, past + t, device=idx.device)
        x = self.embed(idx, pos)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_cache, layer=i, attn_mask=attn_mask)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.final_norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for token ids ``idx`` [B, T].

        ``kv_cache``: continue after the cached positions (and append to the cache).
        ``pos``: explicit position ids [T] or [B, T]; default continues from the cache or,
        with ``attn_mask``, counts real tokens per row.
        ``attn_mask``: bool [B, S] key-padding mask over cached + new positions
        (True = real token), for left-padded batches.
        """
        return self.out_head(self.hidden(idx, kv_cache=kv_cache, pos=pos, attn_mask=attn_mask))


def count_parameters(
    model_or_cfg: nn.Module | GPTConfig, *, include_tied_head: bool = False
) -> int:
    """Number of distinct parameters (a tied head counts once, unless
    ``include_tied_head``). A config is built on the ``meta`` device (no memory)."""
    if isinstance(model_or_cfg, GPTConfig):
        with torch.device("meta"):
            model: nn.Module = GPT(model_or_cfg)
    else:
        model = model_or_cfg
    total = sum(p.numel() for p in model.parameters())
    if include_tied_head and isinstance(model, GPT) and model.is_tied:
        total += model.out_head.weight.numel()
    return total
