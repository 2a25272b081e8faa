"""Text generation: greedy decoding (exact, several tokens per pass where drafts match:
:mod:`gpt.decode`) and temperature / top-k sampling with a KV cache, for batches of
prompts of different lengths (sampling: left padding + key-padding mask + per-row
positions)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpt.decode import DecodeStats, greedy_decode
from gpt.decode_options import DRAFT_NAMES, DraftName
from gpt.drafts import PromptLookup
from gpt.model import GPT, KVCache, positions_from_mask

__all__ = ["DRAFTS", "generate", "generate_padded", "sample_next"]

#: The drafter of each :data:`~gpt.decode_options.DraftName`.
DRAFTS: dict[str, PromptLookup | None] = dict(zip(DRAFT_NAMES, (PromptLookup(), None), strict=True))

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
    draft: DraftName = "prompt_lookup",
    draft_tokens: int = 8,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Returns the new tokens per prompt, stopped before ``eos_id`` (not included). Inputs
    longer than the context keep their last ``context_length`` tokens. The model runs in
    eval mode (its training flag is restored afterwards).

    Greedy (``temperature <= 0``) runs :func:`gpt.decode.greedy_decode`: ``draft`` (a
    key of :data:`DRAFTS`) proposes up to ``draft_tokens`` tokens per row and pass and
    one pass verifies them; the tokens are identical to one-token-at-a-time decoding,
    batched or alone, with or without the KV cache (``stats`` receives the acceptance
    counts). Sampling cannot be verified that way: it decodes one token per pass, prompts
    of different lengths left-padded with ``pad_id`` and masked; ``generator`` seeds it.
    ``compile`` runs that one-token loop through ``torch.compile`` (greedy included; the
    first call pays the compilation; see ``gptflow bench``).
    """
    prompts = _as_prompts(idx)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if draft not in DRAFTS:
        raise ValueError(f"unknown draft {draft!r}; choose one of {sorted(DRAFTS)}")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if temperature <= 0 and not compile and isinstance(model, GPT) and _plain_weights(model):
        done = greedy_decode(
            model,
            prompts,
            max_new_tokens,
            eos_id=eos_id,
            draft=DRAFTS[draft],
            draft_tokens=draft_tokens,
            use_cache=use_cache,
        )
        if stats is not None:
            stats.add(done.stats)
        return done.tokens
    return generate_padded(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        use_cache=use_cache,
        generator=generator,
        pad_id=pad_id,
        compile=compile,
    )


def _plain_weights(model: GPT) -> bool:
    """Whether the model's weights are plain tensors: :mod:`gpt.decode` reads them outside
    the modules' forward, which an FSDP-sharded model (DTensor weights, gathered only
    inside forward) does not allow; such a model decodes one token per pass."""
    return not any(hasattr(p, "placements") for p in model.parameters())


@torch.inference_mode()
def generate_padded(
    model: GPT,
    prompts: Sequence[Sequence[int]],
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
    """One token per forward pass for the whole batch: prompts left-padded with
    ``pad_id`` and masked, one KV cache, finished rows carried along until all are done.
    What sampling and ``compile`` run; greedy decoding ran this way before
    :mod:`gpt.decode` (the benchmarks' baseline). Greedy rows get the same tokens as
    decoding them alone up to the last bits of the logits (padding changes the
    reductions' grouping)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or max_new_tokens <= 0:
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
