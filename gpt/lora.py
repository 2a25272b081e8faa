"""Low-rank adaptation (LoRA): frozen linear layers plus a trained low-rank update.

A :class:`LoRALinear` computes ``y = W x + b + (alpha / rank) · B A x`` with the base
``W``, ``b`` frozen, ``A`` (rank × in) initialised like a linear layer's weight and ``B``
(out × rank) initialised to zero, so a freshly adapted model computes exactly what its
base computes. A fused layer (the attention's ``qkv``) is adapted per part: query, key
and value each get their own ``A`` and ``B``, as the book's separate ``W_query``,
``W_key``, ``W_value`` layers do — a rank-r update of each projection, not one rank-r
update of the fused output.

:func:`apply_lora` swaps the chosen layers, found by module path, for LoRA layers in
place (the base tensors stay the same objects, so a tied head stays tied and the state
dict keeps its names; the adapter adds ``<path>.lora_A`` / ``<path>.lora_B``);
:func:`merge_lora` folds every update into plain ``nn.Linear`` weights for inference and
export. A model without LoRA layers is untouched: the plain path runs no extra code.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, field_validator, model_validator
from torch import nn

from gpt.config import Args
from gpt.errors import ConfigError

__all__ = [
    "FUSED_PARTS",
    "LoRALinear",
    "LoraArgs",
    "LoraSetting",
    "apply_lora",
    "count_trainable",
    "has_lora",
    "linear_rows",
    "lora_layer_names",
    "lora_modules",
    "lora_targets",
    "merge_lora",
]

#: Fused linear layers of :class:`gpt.model.GPT` and the projections packed in their
#: output, in order and of equal width (``MultiHeadAttention`` splits ``qkv`` so).
FUSED_PARTS: dict[str, tuple[str, ...]] = {"qkv": ("query", "key", "value")}


@cache
def lora_layer_names() -> tuple[str, ...]:
    """Every name :attr:`LoraArgs.layers` accepts, in model order: the last component of
    each ``nn.Linear``'s module path in a GPT, a fused layer replaced by its parts."""
    from gpt.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=8, context_length=4, emb_dim=8, n_heads=1, n_layers=1))
    names: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            leaf = path.rsplit(".", 1)[-1]
            names += FUSED_PARTS.get(leaf, (leaf,))
    return tuple(dict.fromkeys(names))


class LoraArgs(Args):
    """Low-rank adaptation of a finetune (``finetune_spam.lora``, ``finetune_instruct.lora``;
    unset = full finetune). Every base weight is frozen; only the adapters (and, for the
    classifier, whatever ``trainable_blocks`` / ``train_final_norm`` still name) train.
    ``--set finetune_spam.lora=true`` takes the defaults below (the book's setting)."""

    rank: int = Field(16, ge=1)
    """Rank r of each update ``B A`` (A: r × in, B: out × r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by ``alpha / rank`` (peft's convention;
    the book multiplies by ``alpha`` itself, so its rank 16 / alpha 16 is alpha 256 here)."""
    layers: tuple[str, ...] = Field(default_factory=lambda: lora_layer_names())
    """Which linear layers of every block (and the output head) get an adapter, by name:
    ``query``, ``key``, ``value`` (the parts of the fused ``qkv``), ``out_proj``, ``fc1``,
    ``fc2``, ``out_head``; ``"all"`` (the default, as in the book) is every one of them."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (the base path has none of it)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {} if data is True else data

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        known = lora_layer_names()
        if value == "all" or (isinstance(value, list | tuple) and "all" in value):
            return known
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            unknown = [v for v in value if v not in known]
            if unknown:
                raise ValueError(
                    f"unknown layer name(s) {unknown}; choose from {list(known)} or 'all'"
                )
            if not value:
                raise ValueError(f"name at least one layer of {list(known)} (or 'all')")
            return tuple(n for n in known if n in value)  # one order: one cache key
        return value


def _off(value: Any) -> Any:
    return None if value is False else value


#: The type of a finetune's ``lora`` field: None (or ``false``) = off, ``true`` = the
#: defaults of :class:`LoraArgs`, an object = those settings.
LoraSetting = Annotated[LoraArgs | None, BeforeValidator(_off)]


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank update of some output slices (``parts``).

    ``weight`` and ``bias`` are the base layer's own parameters (shared, not copied);
    part ``i`` covers output rows ``parts[i] = (offset, size)`` and owns rows
    ``i·r … (i+1)·r`` of ``lora_A`` (n·r × in) and the matching ``size`` rows of
    ``lora_B`` (Σ size × r). A plain layer has one part covering every output."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        parts: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.dropout = float(dropout)
        self.parts = tuple(parts) if parts is not None else ((0, base.out_features),)
        self.part_names: tuple[str, ...] = ()
        """Names of the adapted parts (see :data:`FUSED_PARTS`), set by :func:`apply_lora`."""
        for off, size in self.parts:
            if off < 0 or size <= 0 or off + size > base.out_features:
                raise ConfigError(f"LoRA part {(off, size)} outside {base.out_features} outputs")
        w = base.weight
        n, rows = len(self.parts), sum(size for _, size in self.parts)
        self.lora_A = nn.Parameter(torch.empty(n * self.rank, self.in_features, **_like(w)))
        self.lora_B = nn.Parameter(torch.zeros(rows, self.rank, **_like(w)))
        for i in range(n):  # each part's A as nn.Linear initialises a weight
            nn.init.kaiming_uniform_(self.lora_A[i * self.rank : (i + 1) * self.rank], a=5**0.5)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, parts={self.parts}"

    def pieces(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(offset, size, A_i, B_i)`` per part."""
        out, row = [], 0
        for i, (off, size) in enumerate(self.parts):
            a = self.lora_A[i * self.rank : (i + 1) * self.rank]
            out.append((off, size, a, self.lora_B[row : row + size]))
            row += size
        return out

    def delta(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(alpha / rank) · B A x`` for output rows ``start:stop`` (zeros where no part
        is adapted)."""
        stop = self.out_features if stop is None else stop
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        pieces: list[torch.Tensor] = []
        at = start
        for off, size, a, b in self.pieces():
            lo, hi = max(off, start), min(off + size, stop)
            if lo >= hi:
                continue
            if lo > at:
                pieces.append(x.new_zeros(*x.shape[:-1], lo - at))
            pieces.append(F.linear(F.linear(x, a), b[lo - off : hi - off]))
            at = hi
        if at < stop:
            pieces.append(x.new_zeros(*x.shape[:-1], stop - at))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return out * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output rows ``start:stop`` only (``forward(x)[..., start:stop]`` for less work)."""
        bias = None if self.bias is None else self.bias[start:stop]
        return F.linear(x, self.weight[start:stop], bias) + self.delta(x, start, stop)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / rank) · B A`` (a new tensor; the base weight is unchanged)."""
        w = self.weight.detach().clone()
        for off, size, a, b in self.pieces():
            w[off : off + size] += self.scale * (b @ a).to(w.dtype)
        return w


def _like(t: torch.Tensor) -> dict[str, Any]:
    return {"device": t.device, "dtype": t.dtype}


def linear_rows(layer: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``layer(x)[..., start:stop]`` of a linear layer (plain or LoRA), computing only
    those output rows."""
    if isinstance(layer, LoRALinear):
        return layer.rows(x, start, stop)
    bias = None if layer.bias is None else layer.bias[start:stop]
    return F.linear(x, layer.weight[start:stop], bias)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module path: LoRA layer}`` of ``model``."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds any LoRA layer."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def count_trainable(model: nn.Module) -> int:
    """Parameters that receive gradients (each shared tensor once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora_targets(model: nn.Module, layers: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``{module path: adapted part names}`` of the linear layers of ``model`` named by
    ``layers`` (see :attr:`LoraArgs.layers`); a plain layer's only part is its name."""
    out: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = path.rsplit(".", 1)[-1]
        parts = tuple(p for p in FUSED_PARTS.get(leaf, (leaf,)) if p in layers)
        if parts:
            out[path] = parts
    return out


def _slices(leaf: str, parts: tuple[str, ...], out_features: int) -> tuple[tuple[int, int], ...]:
    names = FUSED_PARTS.get(leaf, (leaf,))
    width = out_features // len(names)
    return tuple((names.index(p) * width, width) for p in parts)


def apply_lora(
    model: nn.Module,
    targets: Mapping[str, tuple[str, ...]],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    seed: int | None = None,
    freeze: bool = True,
) -> dict[str, LoRALinear]:
    """Replace the linear layer at each module path of ``targets`` (path → adapted part
    names, as :func:`lora_targets` gives) by a :class:`LoRALinear` around it, in place.
    With ``freeze`` every parameter that is not an adapter stops receiving gradients
    first (the caller may unfreeze some again). ``seed`` seeds the ``A`` matrices
    (without touching the global RNG). Returns the new layers by path."""
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    made: dict[str, LoRALinear] = {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for path, parts in targets.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            base = getattr(parent, leaf)
            if isinstance(base, LoRALinear):
                raise ConfigError(f"{path} already has a LoRA adapter")
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"{path} is a {type(base).__name__}, not a linear layer")
            layer = LoRALinear(
                base,
                rank,
                alpha,
                dropout=dropout,
                parts=_slices(leaf, parts, base.out_features),
            )
            layer.part_names = tuple(parts)
            setattr(parent, leaf, layer)
            made[path] = layer
    return made


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``model`` into a plain ``nn.Linear`` holding
    ``W + (alpha / rank) · B A`` (in place; returns ``model``). A head that shared the
    token embedding's weight gets its own merged weight (the embedding is unchanged)."""
    for path, layer in lora_modules(model).items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        plain = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        plain.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if layer.bias is not None:
            plain.bias = layer.bias
        plain.train(layer.training)
        setattr(parent, leaf, plain)
    return model
