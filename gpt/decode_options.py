"""Names of the decoding options that settings classes offer, importable without torch
(``gptflow --help`` and cached reruns build settings without loading a model)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DRAFT_NAMES", "WEIGHTS", "DraftName", "WeightsKind"]

#: Where greedy decoding's drafted tokens come from: ``prompt_lookup`` (n-grams of the
#: prompt and the text so far, :mod:`gpt.drafts`) or ``none`` (one token per pass).
DraftName = Literal["prompt_lookup", "none"]
DRAFT_NAMES: tuple[str, ...] = get_args(DraftName)

#: The weights decoding runs on: ``fp32`` (the checkpoint's own) or ``int8``
#: (:mod:`gpt.quantize`, opt-in: changes the tokens).
WeightsKind = Literal["fp32", "int8"]
WEIGHTS: tuple[str, ...] = get_args(WeightsKind)
