"""One exact decoding step over many rows: the computation :mod:`gpt.decode` runs for
every position it generates, the same bits however the positions are grouped.

- **Linear layers** (with their LayerNorm/GELU) run on row counts that a bitwise
  probe of the model's own modules certified (:class:`RowPlan`): a row gets the same
  bits in a call of any certified size as in a 2-row call (a lone row is padded to 2).
  An ``nn.Linear`` is computed as ``W @ x.T`` (rows as the GEMM's columns): on this
  project's CPUs (MKL) that rounds a row one way for every call from 2 rows up to a
  limit the probe finds (56 rows for the 124M model's 3072-wide ``fc2``), where
  ``x @ W.T`` has three roundings (1, 2-15 and 16+ rows). Sizes are certified lazily up
  :data:`LADDER` (every count to 16, then steps of 8); a step's rows are padded once to
  the next certified size (copies of the last row ride along), longer steps run in
  blocks.
- **Attention** runs for all rows of a step in one call per layer whose shape per
  (slot, head) is fixed but for the number of queries: keys and values come from a
  :class:`SlotCache` (one slot per row, room for the whole context, zeros where
  unwritten), scores are ``K @ q.T`` and the output ``V.T @ p.T``, so a query's
  reductions run over ``head_dim`` and over the keys whatever else shares the call;
  the keys are trimmed to a multiple of :data:`WIDTH` past the last one attended
  (masked keys add exact zeros). Both are certified by :func:`attention_certified`;
  where batching is not, one call per query.

A row's work in a step is up to :data:`CHUNK` tokens after its cached positions (its
prompt is prefilled in chunks of that size, with other rows' steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gpt.model import GPT

__all__ = ["CHUNK", "LADDER", "WIDTH", "BlockOps", "RowPlan", "SlotCache", "attend",
           "attention_certified", "attention_mask", "row_plan", "rows_linear", "run"]  # fmt: skip

log = logging.getLogger(__name__)

#: Most tokens of one row in one step (longer work, e.g. a prompt, runs in chunks).
CHUNK = 32
#: Row counts per call that may be certified: every count to 16, then steps of 8.
LADDER: tuple[int, ...] = (*range(1, 17), *range(24, 8 * CHUNK + 1, 8))
_BASE = 19  # probe rows (prime, so no kernel tile lines up with the repetition)

RowFn = Callable[[torch.Tensor], torch.Tensor]


def rows_linear(mod: nn.Module) -> RowFn:
    """``mod`` applied to rows [M, in] -> [M, out]; an ``nn.Linear`` as ``W @ x.T`` (one
    rounding for every block size from 2 rows up, see the module docstring)."""
    if type(mod) is not nn.Linear:
        return mod
    w, b = mod.weight, mod.bias

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = torch.mm(w, x.T) if b is None else torch.addmm(b[:, None], w, x.T)
        return y.T.contiguous()

    return fn


class _Probe:
    """The probe of one row-wise op: its rows' bits in 2-row calls (computed on first
    need), and which call sizes give every row those bits. Verdicts are shared by every
    op with the same kernel signature (kernels choose their code path by shape, not by
    data)."""

    def __init__(self, fn: RowFn, dim: int, like: torch.Tensor, verdicts: dict) -> None:
        self.fn, self.dim, self.like, self.verdicts = fn, dim, like, verdicts
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None

    def check(self, size: int, offset: int = 1) -> bool:
        """Whether a ``size``-row call (rows at a shifted offset) gives each row its 2-row
        bits."""
        if (size, offset) not in self.verdicts:
            if self._ref is None:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(_BASE + 1, self.dim, generator=g)
                x = x.to(device=self.like.device, dtype=self.like.dtype)
                ref = torch.cat([self.fn(x[i : i + 2]) for i in range(0, _BASE, 2)])
                self._ref = (x[:_BASE], ref[:_BASE])
            x, ref = self._ref
            idx = ((torch.arange(size) + offset) % _BASE).to(x.device)
            self.verdicts[size, offset] = torch.equal(self.fn(x[idx]), ref[idx])
        return self.verdicts[size, offset]


_VERDICTS: dict[tuple[Any, ...], dict[tuple[int, int], bool]] = {}


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What selects a module's kernels: its module types, parameter and buffer shapes and
    dtypes."""
    mods = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    tensors = tuple(
        (n, tuple(t.shape), str(t.dtype))
        for n, t in [*module.named_parameters(), *module.named_buffers()]
    )
    return mods, tensors


class BlockOps:
    """The row-wise computations of one transformer block (and the head), as called by
    :func:`run` and probed by :func:`row_plan`."""

    def __init__(self, model: GPT) -> None:
        self.qkv = [_chain(b.norm1, rows_linear(b.att.qkv)) for b in model.blocks]
        self.out = [rows_linear(b.att.out_proj) for b in model.blocks]
        self.ff = [_ff(b) for b in model.blocks]
        self.head = _chain(model.final_norm, rows_linear(model.out_head))


def _chain(first: RowFn, second: RowFn) -> RowFn:
    return lambda c: second(first(c))


def _ff(block: nn.Module) -> RowFn:
    ff = block.ff
    if not (hasattr(ff, "fc1") and hasattr(ff, "fc2")):
        return _chain(block.norm2, ff)
    fc1, fc2 = rows_linear(ff.fc1), rows_linear(ff.fc2)
    gelu = torch.nn.functional.gelu
    return lambda c: fc2(gelu(fc1(block.norm2(c)), approximate="tanh"))


class RowPlan:
    """Row counts per call that give every row the same bits (see the module docstring).

    ``check(size)`` certifies a call size (for every op of a step); sizes are probed
    lazily up :data:`LADDER`, and the first failure ends the ladder."""

    def __init__(self, check: Callable[[int], bool], min_rows: int) -> None:
        self._check = check
        self.min_rows = min_rows
        self._sizes = [s for s in LADDER if s >= min_rows]
        self._top = -1  # index of the largest certified size
        self._closed = False

    @property
    def max_rows(self) -> int:
        """The largest size certified so far (1 when none: one row per call)."""
        return self._sizes[self._top] if self._top >= 0 else 1

    @property
    def multi(self) -> bool:
        """Whether several rows may share a call (what makes drafting pay off)."""
        return self.size(2) >= 2

    def size(self, m: int) -> int:
        """The certified call size for ``m`` rows: the smallest certified size >= ``m``,
        else the largest certified (``m`` is then split into blocks)."""
        while not self._closed and self.max_rows < m and self._top + 1 < len(self._sizes):
            nxt = self._sizes[self._top + 1]
            if self._check(nxt):
                self._top += 1
            else:
                self._closed = True
        if self._top < 0:
            return 1
        for s in self._sizes[: self._top + 1]:
            if s >= m:
                return s
        return self.max_rows

    def apply(self, fn: RowFn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` over the rows of ``x`` [M, D], in certified calls (padded with copies of
        a block's last row where short)."""
        outs, s0, m = [], 0, x.shape[0]
        while s0 < m:
            size = self.size(m - s0)
            e = min(m, s0 + size)
            chunk = x[s0:e]
            if size > e - s0:
                chunk = torch.cat([chunk, chunk[-1:].expand(size - (e - s0), -1)])
            outs.append(fn(chunk)[: e - s0])
            s0 = e
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.inference_mode()
def row_plan(model: GPT) -> RowPlan:
    """The certified row counts for ``model``'s decoding steps on this machine (probed
    per kernel signature, thread count and device; see the module docstring)."""
    ref_w = model.tok_emb.weight
    where = (str(ref_w.device), str(ref_w.dtype), torch.get_num_threads())
    ops = BlockOps(model)
    certs: list[_Probe] = []
    seen: set[tuple[Any, ...]] = set()
    d = model.cfg.emb_dim
    for i, blk in enumerate(model.blocks):
        sig = _signature(blk)
        if sig in seen:
            continue
        seen.add(sig)
        for name, fn in (("qkv", ops.qkv[i]), ("out", ops.out[i]), ("ff", ops.ff[i])):
            certs.append(_Probe(fn, d, ref_w, _VERDICTS.setdefault((name, sig, where), {})))
    head = (_signature(model.final_norm), _signature(model.out_head))
    certs.append(_Probe(ops.head, d, ref_w, _VERDICTS.setdefault(("head", head, where), {})))

    def check(size: int) -> bool:
        ok = all(c.check(size) for c in certs)
        log.debug("decode rows per call %d on %s: %s", size, where, ok)
        return ok

    ones = all(c.check(1, 0) and c.check(1, 1) for c in certs)
    return RowPlan(check, 1 if ones else 2)


# --------------------------------------------------------------------------- attention


class SlotCache:
    """Keys and values of ``slots`` rows, each slot room for the whole context (zeros
    where unwritten, so masked keys stay finite); ``length[s]`` positions of slot ``s``
    are valid."""

    def __init__(self, model: GPT, slots: int) -> None:
        cfg = model.cfg
        w = model.tok_emb.weight
        shape = (2, slots, cfg.n_heads, cfg.context_length, cfg.head_dim)
        self.kv = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in model.blocks]
        """Per layer: keys (``[0]``) and values (``[1]``), [2, S, H, C, hd]."""
        self.length = [0] * slots
        self.slots, self.capacity = slots, cfg.context_length


def attention_mask(lim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Additive mask [S, 1, n, C] for :func:`attend`: 0 where query ``(s, j)`` sees key
    ``c`` (``c < lim[s, j]``), -inf elsewhere."""
    keep = torch.arange(capacity, device=lim.device) < lim[:, None, :, None]
    zero = torch.zeros((), device=lim.device)
    return torch.where(keep, zero, torch.full((), float("-inf"), device=lim.device))


def attend(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal attention of queries ``q`` [S, H, n, hd] over slot keys/values ``k``, ``v``
    [S, H, C, hd] under an :func:`attention_mask`. Returns [S, H, n, hd].

    Shapes per (slot, head) are fixed but for ``n``, and ``n`` only counts the GEMMs'
    columns: a query's reductions (over ``hd``, then over all ``C`` keys, masked ones
    adding exact zeros) run the same way whatever else shares the call."""
    s, h, c, hd = k.shape
    n = q.shape[2]
    kb, vb = k.reshape(s * h, c, hd), v.reshape(s * h, c, hd)
    scores = torch.bmm(kb, q.reshape(s * h, n, hd).transpose(1, 2)).transpose(1, 2)
    scores = (scores * (1.0 / hd**0.5)).reshape(s, h, n, c) + mask
    p = torch.softmax(scores, dim=-1)
    out = torch.bmm(vb.transpose(1, 2), p.reshape(s * h, n, c).transpose(1, 2))
    return out.transpose(1, 2).reshape(s, h, n, hd)


#: Keys are trimmed to a multiple of this (masked keys add exact zeros: same bits).
WIDTH = 32
_ATTENTION_OK: dict[tuple[Any, ...], tuple[bool, bool]] = {}


@torch.inference_mode()
def attention_certified(model: GPT) -> tuple[bool, bool]:
    """Whether :func:`attend` gives a query the same bits in a call with other slots and
    queries as alone (one slot, one query), and whether trimming the keys to a multiple
    of :data:`WIDTH` past the last one attended keeps them; probed once per shape,
    threads and device."""
    cfg, w = model.cfg, model.tok_emb.weight
    key = (cfg.n_heads, cfg.context_length, cfg.head_dim, str(w.device), str(w.dtype),
           torch.get_num_threads())  # fmt: skip
    if key not in _ATTENTION_OK:
        g = torch.Generator().manual_seed(1)
        s, n, (h, c, hd) = 3, 5, key[:3]

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device=w.device, dtype=w.dtype)

        k, v, q = rand(s, h, c, hd), rand(s, h, c, hd), rand(s, h, n, hd)
        lim = torch.randint(1, c + 1, (s, n), generator=g).to(w.device)
        together = attend(k, v, q, attention_mask(lim, c))
        alone = torch.stack([
            torch.cat([attend(k[i : i + 1], v[i : i + 1], q[i : i + 1, :, j : j + 1],
                              attention_mask(lim[i : i + 1, j : j + 1], c))
                       for j in range(n)], dim=2)[0]
            for i in range(s)
        ])  # fmt: skip
        trim = True
        for width in sorted({min(c, WIDTH), min(c, -(-c // 2 // WIDTH) * WIDTH)}):
            short = lim.clamp(max=width)
            full = attend(k, v, q, attention_mask(short, c))
            cut = attend(k[:, :, :width], v[:, :, :width], q, attention_mask(short, width))
            trim = trim and torch.equal(full, cut)
        _ATTENTION_OK[key] = (torch.equal(together, alone), trim)
        log.debug("decode attention on %s: batched, trimmed %s", key, _ATTENTION_OK[key])
    return _ATTENTION_OK[key]


# --------------------------------------------------------------------------- the step


def _forward(
    model: GPT,
    ops: BlockOps,
    plan: RowPlan,
    cache: SlotCache,
    part: Sequence[tuple[int, Sequence[int]]],
    attention: tuple[bool, bool],
) -> torch.Tensor:
    """One chunk of work (``(slot, tokens)`` after each slot's cached positions) through
    the blocks; keys/values written and lengths advanced. Returns the final hidden rows
    [M, D] before the head. The rows are padded once to a certified call size (copies
    of the last row ride along: no per-layer padding)."""
    batched, trim = attention
    device = cache.kv[0].device
    d, h, hd = model.cfg.emb_dim, model.cfg.n_heads, model.cfg.head_dim
    si_l = [s for s, toks in part for _ in toks]
    ji_l = [j for _, toks in part for j in range(len(toks))]
    pos_l = [cache.length[s] + j for s, toks in part for j in range(len(toks))]
    m = len(si_l)
    mp = max(m, plan.size(m))
    pad = mp - m
    ids = torch.tensor([[t for _, toks in part for t in toks] + [part[-1][1][-1]] * pad])
    si = torch.tensor(si_l + si_l[-1:] * pad, device=device)
    ji = torch.tensor(ji_l + ji_l[-1:] * pad, device=device)
    pos = torch.tensor(pos_l + pos_l[-1:] * pad, device=device)
    x = model.embed(ids.to(device), pos[None])[0]
    n = max(len(toks) for _, toks in part)
    width = cache.capacity
    if trim and batched:  # the one-query calls keep one width
        width = min(width, -(-(max(pos_l) + 1) // WIDTH) * WIDTH)
    lim = torch.full((cache.slots, n), width, device=device)
    lim[si, ji] = pos + 1
    mask = attention_mask(lim, width)
    qs = x.new_zeros(cache.slots, h, n, hd)  # queries by (slot, place); the rest stay 0
    for layer in range(len(model.blocks)):
        qkv = plan.apply(ops.qkv[layer], x)
        q = qkv[:, :d].reshape(mp, h, hd)
        kv = cache.kv[layer]
        kv[:, si[:m], :, pos[:m]] = qkv[:m, d:].reshape(m, 2, h, hd)
        keys, values = kv[0, :, :, :width], kv[1, :, :, :width]
        if batched:
            qs[si[:m], :, ji[:m]] = q[:m]
            att = attend(keys, values, qs, mask)[si, :, ji].reshape(mp, d)
        else:  # one call per query, all of one shape
            one = [
                attend(keys[s : s + 1], values[s : s + 1], q[i].reshape(1, h, 1, hd),
                       attention_mask(pos[i : i + 1].reshape(1, 1) + 1, width)).reshape(1, d)
                for i, s in enumerate(si_l)
            ]  # fmt: skip
            att = torch.cat(one + one[-1:] * pad)
        x = x + plan.apply(ops.out[layer], att)
        x = x + plan.apply(ops.ff[layer], x)
    for s, toks in part:
        cache.length[s] += len(toks)
    return x[:m]


def run(
    model: GPT,
    plan: RowPlan,
    cache: SlotCache,
    work: Sequence[tuple[int, Sequence[int]]],
    need: Sequence[int],
    *,
    ops: BlockOps | None = None,
) -> torch.Tensor:
    """Logits [sum(need), V] for the last ``need[i]`` tokens (at most :data:`CHUNK`) of
    each row's work ``(slot, tokens)``, which continues that slot's cached positions.
    Long work runs in chunks; every row's last chunk shares the final call. Keys and
    values are written and the slots' lengths advanced over all the tokens."""
    ops = ops or BlockOps(model)
    attention = attention_certified(model)
    pieces = []
    for _, toks in work:
        first = len(toks) % CHUNK or CHUNK
        pieces.append(
            [toks[:first]] + [toks[i : i + CHUNK] for i in range(first, len(toks), CHUNK)]
        )
    steps = max(len(p) for p in pieces)
    x = None
    for step in range(steps):
        part = [
            (slot, p[step - (steps - len(p))])
            for (slot, _), p in zip(work, pieces, strict=True)
            if step >= steps - len(p)
        ]
        x = _forward(model, ops, plan, cache, part, attention)
    assert x is not None
    rows, i0 = [], 0
    for (_, p), k in zip(zip(work, pieces, strict=True), need, strict=True):
        last = len(p[-1])
        if k > last:
            raise ValueError(f"need {k} logits from a last chunk of {last} tokens")
        rows += range(i0 + last - k, i0 + last)
        i0 += last
    return plan.apply(ops.head, x[torch.tensor(rows, device=x.device)])
