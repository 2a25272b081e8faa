"""Exact greedy decoding that verifies several drafted tokens per forward pass.

Why it is exact
---------------
Greedy decoding takes the argmax of fp32 logits. A forward pass over k new tokens
computes the same function as k one-token passes, but not necessarily the same bits:
a BLAS matmul rounds each output row differently depending on how many rows share the
call (MKL on this project's CPUs, ``x @ W.T``: a 1-row call is a GEMV, 2-15 rows and
>= 16 rows are two further kernels, each rounding differently), and a fused attention
kernel reduces over a different number of keys when queries are batched. On a near-tie those last
bits pick a different token. So this decoder never compares numbers computed in
different ways; it computes every generated position in one way, whichever way the
positions are grouped:

- each step's work (every active row's pending token and drafts, and the prompts of
  rows just admitted, in chunks) runs through :func:`gpt.decode_step.run`: linear
  layers on row counts a bitwise probe of the model's own modules certified on this
  machine, attention in one call of fixed per-query shape for all rows (details in
  :mod:`gpt.decode_step`). The certificates are per process, thread count and device:
  kernels choose their code path by shape, not by data, so a probe on random rows
  speaks for all rows. Where no call of two or more rows is certified, rows run one per
  call and nothing is drafted; where batched attention is not, it runs one query per
  call;
- once a row's text outgrows the context every token is recomputed over the sliding
  window in one call of its own, as one-token decoding does.

Plain greedy decoding (``draft=None``) runs the very same computation one token per
pass, so multi-token decoding, batching (rows accept different numbers of tokens and
are admitted and retired independently) and the no-KV-cache mode (the keys and values
recomputed from the text at every step) all return the tokens plain greedy decoding
returns, by construction, with no tolerance anywhere. Sampling is not covered: it
decodes one token per pass (:func:`gpt.generate.generate`).

The speed-up depends on the acceptance rate: a pass over 1 + k tokens costs more than a
one-token pass, and pays off only when enough drafted tokens match (see
:class:`DecodeStats`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gpt.decode_step import CHUNK, BlockOps, RowPlan, SlotCache, row_plan, run
from gpt.drafts import NgramIndex, PromptLookup
from gpt.model import GPT

__all__ = ["DecodeStats", "Decoded", "RowPlan", "greedy_decode", "row_plan"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- decoding


@dataclass
class DecodeStats:
    """What a decoding run did; the acceptance rate is what the speed-up depends on."""

    prompts: int = 0
    """Rows decoded."""
    new_tokens: int = 0
    """Tokens returned (end-of-text excluded)."""
    passes: int = 0
    """Decoding forward passes after the prefills (one pass serves every active row)."""
    row_passes: int = 0
    """Rows summed over those passes."""
    drafted: int = 0
    """Drafted tokens verified."""
    accepted: int = 0
    """Drafted tokens that matched the model's own greedy choice."""
    window_passes: int = 0
    """One-token passes over a full sliding window (rows past the context)."""
    block_rows: list[int] = field(default_factory=lambda: [1, 1])
    """Rows per call ``[min, max]``: a lone row is padded to min; max is the largest
    certified call size reached (see :class:`RowPlan`)."""

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_row_pass(self) -> float | None:
        """New tokens per row per decoding pass (1.0 = one-token decoding)."""
        done = self.accepted + self.row_passes
        return done / self.row_passes if self.row_passes else None

    def add(self, other: DecodeStats) -> None:
        """Accumulate ``other`` into this."""
        for k in ("prompts", "new_tokens", "passes", "row_passes", "drafted", "accepted"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.window_passes += other.window_passes
        self.block_rows = list(other.block_rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the derived rates."""
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_row_pass": self.tokens_per_row_pass,
        }


@dataclass
class Decoded:
    """Result of :func:`greedy_decode`."""

    tokens: list[list[int]]
    """New tokens per prompt (stopped before end-of-text)."""
    seconds: list[float]
    """Per prompt: its share of the wall time (each pass's time split over its rows)."""
    stats: DecodeStats


@dataclass
class _Row:
    i: int
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    slot: int = -1
    index: NgramIndex | None = None
    k: int = 0
    done: bool = False
    seconds: float = 0.0

    @property
    def text(self) -> list[int]:
        return self.prompt + self.out


@torch.inference_mode()
def greedy_decode(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    draft: PromptLookup | None = PromptLookup(),
    draft_tokens: int = 8,
    use_cache: bool = True,
    batch_size: int | None = None,
    on_done: Callable[[int, list[int]], None] | None = None,
) -> Decoded:
    """Greedy continuations of ``prompts`` (each cropped to its last ``context_length``
    tokens), identical to one-token-at-a-time greedy decoding (module docstring).

    ``draft``: where drafted tokens come from (None: one token per pass);
    ``draft_tokens``: most tokens drafted per row and pass (at most ``CHUNK - 1``; the
    decoder drafts fewer for a row whose drafts were rejected). ``use_cache=False``
    recomputes each row's keys and values from its text at every step (same tokens;
    quadratic time). ``batch_size``: most rows decoded together; a finished row's place
    goes to the next prompt, whose prefill shares the others' next pass. ``on_done(i,
    tokens)`` is called as each prompt finishes.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
    draft_tokens = min(draft_tokens, CHUNK - 1)
    ctx = model.cfg.context_length
    stats = DecodeStats(prompts=len(prompts))
    rows = [_Row(i, [int(t) for t in p][-ctx:]) for i, p in enumerate(prompts)]
    if max_new_tokens <= 0 or not rows:
        return Decoded([[] for _ in rows], [0.0] * len(rows), stats)
    plan = row_plan(model)
    drafting = draft is not None and draft_tokens > 0 and plan.multi
    if draft is not None and draft_tokens > 0 and not plan.multi:
        log.info(
            "multi-token decoding off: this machine's kernels round rows differently in "
            "calls of different sizes, so drafts could not be verified exactly"
        )
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    limit = min(batch_size or len(rows), len(rows))
    cache = SlotCache(model, limit)
    ops = BlockOps(model)
    free = list(reversed(range(limit)))

    def emit(row: _Row, toks: Sequence[int]) -> None:
        added = []
        for t in toks:
            if eos_id is not None and t == eos_id:
                row.done = True
                break
            added.append(t)
            if len(row.out) + len(added) >= max_new_tokens:
                row.done = True
                break
        row.out += added
        if row.index is not None:
            row.index.extend(added)
        if row.done:
            stats.new_tokens += len(row.out)
            free.append(row.slot)
            if on_done is not None:
                on_done(row.i, row.out)

    def window_step(row: _Row) -> None:
        t0 = time.perf_counter()
        window = torch.tensor([row.text[-ctx:]], device=device)
        logits = model.out_head(model.hidden(window)[:, -1])
        emit(row, logits.float().argmax(dim=-1).tolist())
        stats.window_passes += 1
        row.seconds += time.perf_counter() - t0

    queue = list(reversed(rows))
    active: list[_Row] = []
    try:
        while queue or active:
            admitted: list[_Row] = []
            while queue and len(active) + len(admitted) < limit:
                row = queue.pop()
                row.slot = free.pop()
                cache.length[row.slot] = 0
                admitted.append(row)
            work: list[tuple[int, list[int]]] = [(r.slot, r.prompt) for r in admitted]
            need = [1] * len(admitted)
            stepping, drafts, starts = [], [], []
            for row in active:
                if len(row.prompt) + len(row.out) > ctx:  # the pending token has no room
                    window_step(row)
                    continue
                if not use_cache:  # recompute the keys and values from the text
                    cache.length[row.slot] = 0
                    start, head = 0, row.text[:-1]
                else:
                    start, head = cache.length[row.slot], []
                room = min(row.k, max_new_tokens - len(row.out) - 1)
                room = min(room, ctx - (start + len(head)) - 1)
                d = row.index.draft(room) if row.index is not None and room > 0 else []
                work.append((row.slot, [*head, row.out[-1], *d]))
                need.append(1 + len(d))
                stepping.append(row)
                drafts.append(d)
                starts.append(start + len(head))
            if work:
                t0 = time.perf_counter()
                preds = run(model, plan, cache, work, need, ops=ops).argmax(dim=-1).tolist()
                share = (time.perf_counter() - t0) / len(work)
                for row, p in zip(admitted, preds, strict=False):
                    row.k = draft_tokens
                    if drafting:
                        assert draft is not None
                        row.index = draft.index(row.prompt)
                    row.seconds += share
                    emit(row, [p])
                i0 = len(admitted)
                if stepping:
                    stats.passes += 1
                    stats.row_passes += len(stepping)
                for row, d, start in zip(stepping, drafts, starts, strict=True):
                    p = preds[i0 : i0 + 1 + len(d)]
                    i0 += 1 + len(d)
                    a = 0
                    while a < len(d) and d[a] == p[a]:
                        a += 1
                    cache.length[row.slot] = start + a + 1
                    stats.drafted += len(d)
                    stats.accepted += a
                    if d:  # draft more after a full match, less after a miss
                        row.k = min(draft_tokens, row.k + 2) if a == len(d) else max(1, a + 1)
                    row.seconds += share
                    emit(row, [*d[:a], p[a]])
            active = [r for r in active + admitted if not r.done]
    finally:
        model.train(was_training)
    stats.block_rows = [plan.min_rows, plan.max_rows]  # certified by now
    return Decoded([r.out for r in rows], [r.seconds for r in rows], stats)
