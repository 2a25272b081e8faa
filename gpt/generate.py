"""Text generation: greedy / temperature / top-k sampling with a KV cache, for batches of
prompts of different lengths (left padding + key-padding mask + per-row positions)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpt.model import GPT, KVCache, positions_from_mask

__all__ = ["generate", "sample_next"]

log = logging.getLogger(__name__)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position ``logits`` [B, V]: argmax when
    ``temperature <= 0``, else a draw from softmax(logits / temperature) restricted to the
    ``top_k`` largest logits."""
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@functools.cache
def _compiled_hidden() -> Callable[..., Any]:
    """``GPT.hidden`` through ``torch.compile`` (dynamic shapes: the prompt and the cache
    grow every step), created once per process; torch keeps a compiled graph per model."""
    return torch.compile(GPT.hidden, dynamic=True)


def _as_prompts(idx: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        return [row.tolist() for row in idx]
    prompts = [list(map(int, p)) for p in idx]
    return prompts


@torch.inference_mode()
def generate(
    model: GPT,
    idx: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Returns the new tokens per prompt, stopped before ``eos_id`` (not included). Prompts
    of different lengths are left-padded with ``pad_id`` and masked, so each row gets the
    same tokens as generating it alone (greedy). Inputs longer than the context keep their
    last ``context_length`` tokens. ``generator`` seeds sampling. The model runs in eval
    mode (its training flag is restored afterwards). ``compile`` runs the model through
    ``torch.compile`` (the first call pays the compilation; see ``gptflow bench``).
    """
    prompts = _as_prompts(idx)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    ctx = model.cfg.context_length
    device = model.tok_emb.weight.device
    hidden = functools.partial(_compiled_hidden(), model) if compile else model.hidden
    was_training = model.training
    model.eval()
    try:
        prompts = [p[-ctx:] for p in prompts]
        b = len(prompts)
        width = max(len(p) for p in prompts)
        tokens = torch.full((b, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((b, width), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = True
        padded = bool((~mask).any())

        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        cache = KVCache.for_model(model) if use_cache else None
        step_input = tokens  # what the next forward must process
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + step_input.shape[1] <= ctx:
                am = mask if padded else None
                # head on the last position only (prefill of long prompts stays cheap)
                logits = model.out_head(hidden(step_input, kv_cache=cache, attn_mask=am)[:, -1])
            else:
                if cache is not None:  # context full: recompute on the cropped window
                    cache = None
                window, wmask = tokens[:, -ctx:], mask[:, -ctx:]
                am = wmask if bool((~wmask).any()) else None
                pos = positions_from_mask(wmask) if am is not None else None
                logits = model.out_head(hidden(window, pos=pos, attn_mask=am)[:, -1])
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    if eos_id is not None and tok == eos_id:
                        done[i] = True
                    else:
                        out[i].append(tok)
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.bool, device=device)], dim=1)
            step_input = nxt[:, None]
        return out
    finally:
        model.train(was_training)
