"""A GPT's architecture (:class:`GPTConfig`) and the named ones (:data:`CONFIGS`): plain
data, torch-free, so settings that name an architecture are checked without importing
the model code (:mod:`gpt.model` builds the network from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from gpt.errors import ConfigError

__all__ = ["CONFIGS", "GPTConfig", "get_config"]


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
