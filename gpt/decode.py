"""Exact greedy decoding that verifies several drafted tokens per forward pass.

Why it is exact
---------------
Greedy decoding takes the argmax of fp32 logits. A forward pass over k new tokens
computes the same function as k one-token passes, but not necessarily the same bits:
a BLAS matmul rounds each output row differently depending on how many rows share the
call (MKL on this project's CPUs: a 1-row call is a GEMV, 2-15 rows and >= 16 rows are
two further kernels, each rounding differently), and a fused attention kernel reduces
over a different number of keys when queries are batched. On a near-tie those last
bits pick a different token. So this decoder never compares numbers computed in
different ways; it computes every generated position in one way, whichever way the
positions are grouped:

- each linear layer (and its LayerNorm/GELU) runs on blocks of rows whose sizes lie in
  one range that :func:`row_plan` certified on this machine: rows computed in calls of
  any size of that range equal, bit for bit, the same rows computed in 2-row calls (a
  lone row is padded to the range's smallest size). The certificate is a bitwise probe
  of the model's own modules, per process, thread count and device: kernels choose
  their code path by shape, not by data, so a probe on random rows speaks for all rows.
  Where no range of two or more rows is certified, rows run one per call and nothing
  is drafted;
- attention runs one query at a time over exactly that row's cached keys (the same
  call whether the query came alone or with drafts, in a batch or not);
- each prompt is prefilled in one call of its own, and once a row's text outgrows the
  context every token is recomputed over the sliding window in one call of its own, as
  one-token decoding does.

Plain greedy decoding (``draft=None``) runs the very same computation one token per
pass, so multi-token decoding, batching (rows accept different numbers of tokens and
are admitted and retired independently: no padding) and the no-KV-cache mode (the
cache rebuilt from the text at every step) all return the tokens plain greedy decoding
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
import torch.nn.functional as F
from torch import nn

from gpt.drafts import NgramIndex, PromptLookup
from gpt.model import GPT, KVCache

__all__ = ["DecodeStats", "Decoded", "RowPlan", "greedy_decode", "row_plan"]

log = logging.getLogger(__name__)

#: Largest number of rows per call the probe tries (a batch's step is split into blocks).
PROBE_ROWS = 16


@dataclass(frozen=True)
class RowPlan:
    """Row counts per call that give every row the same bits (see the module docstring)."""

    min_rows: int
    """Fewer rows are padded up to this many (1, or 2 where a 1-row call is a GEMV)."""
    max_rows: int
    """More rows are split into blocks of at most this many."""

    @property
    def multi(self) -> bool:
        """Whether several rows may share a call (what makes drafting pay off)."""
        return self.max_rows >= 2

    def blocks(self, m: int) -> list[tuple[int, int]]:
        """``m`` rows as near-equal consecutive ``(start, stop)`` blocks."""
        n = -(-m // self.max_rows)
        base, extra = divmod(m, n)
        out, s = [], 0
        for i in range(n):
            e = s + base + (1 if i < extra else 0)
            out.append((s, e))
            s = e
        return out

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` over the rows of ``x`` [M, D], in certified blocks (padded with copies of
        a block's last row where short)."""
        outs = []
        for s, e in self.blocks(x.shape[0]):
            chunk = x[s:e]
            short = self.min_rows - (e - s)
            if short > 0:
                chunk = torch.cat([chunk, chunk[-1:].expand(short, -1)])
            outs.append(fn(chunk)[: e - s])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _probe(fn: Callable[[torch.Tensor], torch.Tensor], ref: torch.Tensor) -> RowPlan:
    """The row range over which ``fn`` gives each row of ``ref`` the bits it gets in a
    2-row call (rows at shifting offsets, so a row's place in its block is tested too)."""
    x = ref
    pairs = torch.cat([fn(x[i : i + 2]) for i in range(0, x.shape[0] - 1, 2)])
    top = 1
    for m in range(2, PROBE_ROWS + 1):
        o = 1 if m % 2 == 0 else 0
        if not torch.equal(fn(x[o : o + m]), pairs[o : o + m]):
            break
        top = m
    if top < 2:
        return RowPlan(1, 1)
    ones = all(torch.equal(fn(x[i : i + 1]), pairs[i : i + 1]) for i in range(3))
    return RowPlan(1 if ones else 2, top)


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What selects a module's kernels: its module types, parameter and buffer shapes and
    dtypes."""
    mods = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    tensors = tuple(
        (n, tuple(t.shape), str(t.dtype))
        for n, t in [*module.named_parameters(), *module.named_buffers()]
    )
    return mods, tensors


_PLANS: dict[tuple[Any, ...], RowPlan] = {}


def _block_ops(model: GPT) -> list[tuple[tuple[Any, ...], Callable[[torch.Tensor], torch.Tensor]]]:
    """Every row-wise computation of a decoding step, one per distinct kernel signature."""
    ops: list[tuple[tuple[Any, ...], Callable[[torch.Tensor], torch.Tensor]]] = []
    seen: set[tuple[Any, ...]] = set()
    for blk in model.blocks:
        sig = _signature(blk)
        if sig in seen:
            continue
        seen.add(sig)
        ops += [
            (("qkv", sig), lambda c, b=blk: b.att.qkv(b.norm1(c))),
            (("out", sig), lambda c, b=blk: b.att.out_proj(c)),
            (("ff", sig), lambda c, b=blk: b.ff(b.norm2(c))),
        ]
    head = (_signature(model.final_norm), _signature(model.out_head))
    ops.append((("head", head), lambda c: model.out_head(model.final_norm(c))))
    return ops


@torch.inference_mode()
def row_plan(model: GPT) -> RowPlan:
    """The certified row range for ``model``'s decoding steps on this machine (probed once
    per kernel signature, thread count and device; see the module docstring)."""
    ref_w = model.tok_emb.weight
    where = (str(ref_w.device), str(ref_w.dtype), torch.get_num_threads())
    lo, hi = 1, PROBE_ROWS
    for key, fn in _block_ops(model):
        full = (key, where)
        if full not in _PLANS:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(PROBE_ROWS + 2, model.cfg.emb_dim, generator=g)
            _PLANS[full] = _probe(fn, x.to(device=ref_w.device, dtype=ref_w.dtype))
            log.debug("decode row plan for %s on %s: %s", key[0], where, _PLANS[full])
        p = _PLANS[full]
        lo, hi = max(lo, p.min_rows), min(hi, p.max_rows)
    if hi < 2 or lo > hi:
        return RowPlan(1, 1)
    return RowPlan(lo, hi)


# --------------------------------------------------------------------------- the step


def _step_logits(
    model: GPT, work: Sequence[tuple[KVCache, Sequence[int]]], plan: RowPlan, *, head: bool = True
) -> torch.Tensor | None:
    """Logits [sum of lengths, V] for each row's new tokens after its cached positions
    (their keys/values are written into the caches; lengths are left to the caller).

    Mirrors :class:`gpt.model.TransformerBlock` (pre-LN, eval mode) with the row-wise
    work in certified blocks and attention one query at a time."""
    device = model.tok_emb.weight.device
    ids = [t for _, toks in work for t in toks]
    pos = [c.length + j for c, toks in work for j in range(len(toks))]
    x = model.embed(torch.tensor([ids], device=device), torch.tensor([pos], device=device))[
        0
    ]  # [M, D]
    d = model.cfg.emb_dim
    h, hd = model.cfg.n_heads, model.cfg.head_dim
    for layer, blk in enumerate(model.blocks):
        qkv = plan.apply(lambda c, b=blk: b.att.qkv(b.norm1(c)), x)
        att = torch.empty_like(x)
        i0 = 0
        for cache, toks in work:
            t, past = len(toks), cache.length
            rows = qkv[i0 : i0 + t]
            k = rows[:, d : 2 * d].reshape(t, h, hd).transpose(0, 1).unsqueeze(0)
            v = rows[:, 2 * d :].reshape(t, h, hd).transpose(0, 1).unsqueeze(0)
            keys, values = cache.update(layer, k, v)
            for j in range(t):
                q = rows[j, :d].reshape(1, h, 1, hd)
                s = past + j + 1
                o = F.scaled_dot_product_attention(q, keys[:, :, :s], values[:, :, :s])
                att[i0 + j] = o.reshape(d)
            i0 += t
        x = x + plan.apply(blk.att.out_proj, att)
        x = x + plan.apply(lambda c, b=blk: b.ff(b.norm2(c)), x)
    if not head:
        return None
    return plan.apply(lambda c: model.out_head(model.final_norm(c)), x)


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
    """The certified row range per call ``[min, max]`` (see :class:`RowPlan`)."""

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
    cache: KVCache | None = None
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
    ``draft_tokens``: most tokens drafted per row and pass (the decoder drafts fewer for a
    row whose drafts were rejected). ``use_cache=False`` rebuilds each row's cache from
    its text at every step (same tokens; quadratic time). ``batch_size``: most rows
    decoded together; a finished row's place goes to the next prompt. ``on_done(i,
    tokens)`` is called as each prompt finishes.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
    ctx = model.cfg.context_length
    stats = DecodeStats(prompts=len(prompts))
    rows = [_Row(i, [int(t) for t in p][-ctx:]) for i, p in enumerate(prompts)]
    if max_new_tokens <= 0 or not rows:
        return Decoded([[] for _ in rows], [0.0] * len(rows), stats)
    plan = row_plan(model)
    stats.block_rows = [plan.min_rows, plan.max_rows]
    drafting = draft is not None and draft_tokens > 0 and plan.multi
    if draft is not None and draft_tokens > 0 and not plan.multi:
        log.info(
            "multi-token decoding off: this machine's kernels round rows differently in "
            "calls of different sizes, so drafts could not be verified exactly"
        )
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()

    spare: list[KVCache] = []  # caches of finished rows, reused (no new allocation)

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
            if row.cache is not None:
                spare.append(row.cache)
                row.cache = None
            if on_done is not None:
                on_done(row.i, row.out)

    def argmax(logits: torch.Tensor) -> list[int]:  # sample_next's greedy rule
        return logits.float().argmax(dim=-1).tolist()

    def prefill(row: _Row) -> torch.Tensor:
        if row.cache is None:
            row.cache = spare.pop() if spare else KVCache.for_model(model)
        row.cache.reset()
        h = model.hidden(torch.tensor([row.prompt], device=device), kv_cache=row.cache)
        return h[:, -1]

    def admit(row: _Row) -> None:
        t0 = time.perf_counter()
        first = argmax(model.out_head(prefill(row)))
        row.k = draft_tokens
        if drafting:
            assert draft is not None
            row.index = draft.index(row.prompt)
        emit(row, first)
        row.seconds += time.perf_counter() - t0

    def rebuild(row: _Row) -> None:
        """No-cache mode: the cache recomputed from the text (same kernels and blocks)."""
        prefill(row)
        assert row.cache is not None
        if len(row.out) > 1:
            _step_logits(model, [(row.cache, row.out[:-1])], plan, head=False)
            row.cache.length += len(row.out) - 1

    def window_step(row: _Row) -> None:
        t0 = time.perf_counter()
        window = torch.tensor([row.text[-ctx:]], device=device)
        emit(row, argmax(model.out_head(model.hidden(window)[:, -1])))
        stats.window_passes += 1
        row.seconds += time.perf_counter() - t0

    queue = list(reversed(rows))
    active: list[_Row] = []
    limit = batch_size or len(rows)
    try:
        while queue or active:
            while queue and len(active) < limit:
                row = queue.pop()
                admit(row)
                if not row.done:
                    active.append(row)
            stepping: list[_Row] = []
            for row in active:
                if len(row.prompt) + len(row.out) > ctx:  # the pending token has no room
                    window_step(row)
                    continue
                if not use_cache:
                    rebuild(row)
                stepping.append(row)
            if stepping:
                t0 = time.perf_counter()
                work, drafts = [], []
                for row in stepping:
                    assert row.cache is not None
                    room = min(row.k, max_new_tokens - len(row.out) - 1)
                    room = min(room, ctx - row.cache.length - 1)
                    d = row.index.draft(room) if row.index is not None and room > 0 else []
                    drafts.append(d)
                    work.append((row.cache, [row.out[-1], *d]))
                logits = _step_logits(model, work, plan)
                assert logits is not None
                preds = argmax(logits)
                stats.passes += 1
                stats.row_passes += len(stepping)
                i0 = 0
                for row, d, (cache, toks) in zip(stepping, drafts, work, strict=True):
                    p = preds[i0 : i0 + len(toks)]
                    i0 += len(toks)
                    a = 0
                    while a < len(d) and d[a] == p[a]:
                        a += 1
                    cache.length += a + 1
                    stats.drafted += len(d)
                    stats.accepted += a
                    if d:  # draft more after a full match, less after a miss
                        row.k = min(draft_tokens, row.k + 2) if a == len(d) else max(1, a + 1)
                    emit(row, [*d[:a], p[a]])
                share = (time.perf_counter() - t0) / len(stepping)
                for row in stepping:
                    row.seconds += share
            active = [r for r in active if not r.done]
    finally:
        model.train(was_training)
    return Decoded([r.out for r in rows], [r.seconds for r in rows], stats)
