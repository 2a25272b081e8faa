"""Opt-in int8 weights for decoding (CPU): a quarter of the weight traffic, at a cost in
accuracy that the caller must state (``extract_responses`` measures it on every run).

:func:`quantize_int8` returns a copy of a GPT whose linear layers (the output head
included) hold int8 weights, one scale per output channel (symmetric, max |w| / 127).
At run time each input row is quantized to int8 with its own scale (dynamic, per row)
and multiplied through oneDNN's int8 GEMM with the weights packed once; the int32
accumulation is exact, so a row's result does not depend on the other rows of the call
(decoding stays exact, batched or drafted: :mod:`gpt.decode`). torch's weight-only
int8 kernel for fp32 inputs (``_weight_int8pack_mm``) measured slower than fp32 on this
project's CPUs, hence int8 activations. Where oneDNN is missing (or on another device),
the int8 weights are dequantized once and multiplied in fp32 (same weights, no speed-up).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gpt.decode_options import WEIGHTS
from gpt.model import GPT

__all__ = ["Int8Linear", "quantize_int8", "with_weights"]

_QMAX = 127


def _onednn() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops, "onednn")


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-row dynamic int8 inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
        self.register_buffer("weight_q", q.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self._packed: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 -> [M, N] fp32."""
        if x.device.type == "cpu" and _onednn():
            amax = x.abs().amax(dim=1, keepdim=True)
            s = (amax / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
            xq = torch.round(x / s).clamp_(-_QMAX, _QMAX).to(torch.int8)
            if self._packed is None:
                self._packed = torch.ops.onednn.qlinear_prepack(
                    self.weight_q, [1, self.in_features]
                )
            zero = torch.zeros((), dtype=torch.int64)
            # x_scale 1: the op returns weight_scale * (exact int32 sum); the row scale after
            y = torch.ops.onednn.qlinear_pointwise.tensor(
                xq, torch.ones(()), zero, self._packed, self.weight_scale,
                torch.zeros(self.out_features, dtype=torch.int64), None, 1.0, 0,
                torch.float32, "none", [], "",
            )  # fmt: skip
            return y * s
        if self._dense is None or self._dense.device != x.device:
            self._dense = (self.weight_q.float() * self.weight_scale[:, None]).to(x.device)
        return x @ self._dense.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernel(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: GPT) -> GPT:
    """A copy of ``model`` (eval mode) with every ``nn.Linear`` as :class:`Int8Linear`;
    embeddings and LayerNorms stay fp32 (a tied head gets its own int8 copy)."""
    q = copy.deepcopy(model).float().eval()
    for module in list(q.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    for p in q.parameters():
        p.requires_grad_(False)
    return q


def with_weights(model: GPT, weights: str) -> GPT:
    """``model`` itself for ``fp32``, its :func:`quantize_int8` copy for ``int8``."""
    if weights == "fp32":
        return model
    if weights == "int8":
        return quantize_int8(model)
    raise ValueError(f"unknown weights {weights!r}; choose one of {list(WEIGHTS)}")
