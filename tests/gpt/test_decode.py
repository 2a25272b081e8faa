"""Exact multi-token greedy decoding (gpt.decode): the same tokens as one-token decoding
for random prompts and the instruction test set, batch 1 and batched, with and without
the KV cache; the bitwise step invariance that guarantees it; prompt-lookup drafts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gpt.architecture import GPTConfig
from gpt.data.parsing import split_instructions
from gpt.decode import DecodeStats, greedy_decode
from gpt.decode_step import (
    _ATTENTION_OK,
    CHUNK,
    RowPlan,
    SlotCache,
    _Probe,
    attention_certified,
    row_plan,
    run,
)
from gpt.drafts import NgramIndex, PromptLookup
from gpt.generate import generate
from gpt.model import GPT
from gpt.prompts import format_alpaca
from gpt.tokenizer import Tokenizer

SMALL = GPTConfig(
    vocab_size=97, context_length=40, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
    tie_weights=False,
)  # fmt: skip
# tied and wider: its greedy text falls into loops, so prompt lookup gets accepted
LOOPY = SMALL.replace(tie_weights=True, emb_dim=64, vocab_size=211)


def _model(cfg: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def small() -> GPT:
    return _model(SMALL, 10)


@pytest.fixture(scope="module")
def loopy() -> GPT:
    return _model(LOOPY, 3)


def _reference_greedy(m: GPT, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """The plain loop: full forward on the (cropped) text, argmax, append."""
    ctx = m.cfg.context_length
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(m(torch.tensor([seq[-ctx:]]))[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def _prompts(vocab: int, seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


# --------------------------------------------------------------------------- bitwise


@pytest.mark.parametrize("name", ["small", "loopy"])
@torch.inference_mode()
def test_step_logits_bitwise_independent_of_grouping(name: str, request) -> None:
    m = request.getfixturevalue(name)
    plan = row_plan(m)
    assert plan.multi  # these shapes batch rows on this machine's kernels
    prompts = _prompts(m.cfg.vocab_size, 1, [5, 9, 2])
    news = _prompts(m.cfg.vocab_size, 2, [6, 3, 7])

    def prefilled(slots: int) -> SlotCache:
        cache = SlotCache(m, slots)
        run(m, plan, cache, list(enumerate(prompts[:slots])), [1] * slots)
        return cache

    def one_at_a_time(i: int) -> torch.Tensor:
        cache, rows = prefilled(3), []
        for t in news[i]:
            rows.append(run(m, plan, cache, [(i, [t])], [1]))
        return torch.cat(rows)

    alone = [one_at_a_time(i) for i in range(3)]
    for i, ref in enumerate(alone):  # all new tokens of a row in one pass
        assert torch.equal(run(m, plan, prefilled(3), [(i, news[i])], [len(news[i])]), ref)
    # three rows of different lengths in one pass (16 rows: more than one block)
    together = run(m, plan, prefilled(3), list(enumerate(news)), [len(t) for t in news])
    assert torch.equal(together, torch.cat(alone))
    # prefill and new tokens in one chunked call (longer than CHUNK), from an empty slot
    long = (prompts[0] * (CHUNK // 4))[: CHUNK + 1]
    once = run(m, plan, SlotCache(m, 1), [(0, long + news[0])], [len(news[0])])
    cache = SlotCache(m, 1)
    run(m, plan, cache, [(0, long)], [1])
    assert torch.equal(once, run(m, plan, cache, [(0, news[0])], [len(news[0])]))
    # the model's own forward computes the same function (not the same bits)
    full = m(torch.tensor([prompts[0] + news[0]]))[0, len(prompts[0]) :]
    assert torch.allclose(alone[0], full, atol=1e-5, rtol=1e-5)


def _plan(fn, min_rows: int | None = None) -> RowPlan:
    probe = _Probe(fn, 8, torch.zeros(1), {})
    ones = probe.check(1, 0) and probe.check(1, 1)
    return RowPlan(probe.check, min_rows or (1 if ones else 2))


def test_probe_finds_the_rows_a_kernel_treats_alike() -> None:
    same = _plan(lambda c: c * 3.0)
    assert same.min_rows == 1 and same.size(40) == 40 and same.size(17) == 24

    def gemv_then_blocks(c: torch.Tensor) -> torch.Tensor:  # 1 row, 2-5 rows, 6+ rows
        m = c.shape[0]
        return c * (1.0 if m == 1 else 1.0 + 2**-20 if m >= 6 else 1.0 + 2**-21)

    plan = _plan(gemv_then_blocks)
    assert plan.min_rows == 2 and plan.size(11) == 5 and plan.max_rows == 5 and plan.multi
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.apply(gemv_then_blocks, x), x * (1.0 + 2**-21))  # 5, 5, 1 -> 2
    assert torch.equal(plan.apply(gemv_then_blocks, x[:1]), x[:1] * (1.0 + 2**-21))

    def by_position(c: torch.Tensor) -> torch.Tensor:  # a row's bits depend on its place
        return c + torch.arange(c.shape[0], dtype=c.dtype)[:, None] * 1e-3

    alone = _plan(by_position)
    assert not alone.multi and alone.size(3) == 1
    assert torch.equal(alone.apply(by_position, x), x)  # one row per call


def test_one_query_per_call_where_batched_attention_is_not_certified(
    loopy: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = _prompts(LOOPY.vocab_size, 12, [3, 9, 20])
    assert attention_certified(loopy)[0]  # this machine's kernels: batched
    batched = greedy_decode(loopy, prompts, 20, batch_size=3)
    key = next(k for k in _ATTENTION_OK if k[0] == LOOPY.n_heads and k[2] == LOOPY.head_dim)
    monkeypatch.setitem(_ATTENTION_OK, key, (False, False))
    assert greedy_decode(loopy, prompts, 20, batch_size=3).tokens == batched.tokens
    assert batched.stats.accepted > 0


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_same_tokens_as_one_token_decoding(small: GPT, loopy: GPT, use_cache: bool) -> None:
    for m, seed in ((small, 5), (loopy, 6)):
        # lengths up to past the context (40): prompts are cropped, rows slide their window
        prompts = _prompts(m.cfg.vocab_size, seed, [1, 3, 8, 17, 45])
        n = 30
        plain = greedy_decode(m, prompts, n, draft=None, use_cache=use_cache)
        stats = DecodeStats()
        drafted = generate(m, prompts, n, use_cache=use_cache, stats=stats)
        alone = [generate(m, [p], n, use_cache=use_cache)[0] for p in prompts]
        in_twos = greedy_decode(m, prompts, n, batch_size=2, use_cache=use_cache).tokens
        assert drafted == plain.tokens == alone == in_twos
        assert [len(t) for t in drafted] == [n] * len(prompts)
        assert plain.stats.drafted == 0 and plain.stats.window_passes > 0
        if m is loopy:
            assert stats.accepted > 0 and stats.passes < plain.stats.passes
        if use_cache:  # the model's plain forward agrees (no near-ties in these models)
            assert drafted == [_reference_greedy(m, p, n) for p in prompts]


def test_eos_inside_accepted_drafts_and_rows_of_different_lengths(loopy: GPT) -> None:
    prompts = _prompts(LOOPY.vocab_size, 8, [4, 6, 11, 2])
    free = greedy_decode(loopy, prompts, 25, draft=None).tokens
    eos = free[2][9]  # row 2 emits it at step 10 (others maybe earlier or never)
    stats = DecodeStats()
    got = generate(loopy, prompts, 25, eos_id=eos, stats=stats)
    expected = [t[: t.index(eos)] if eos in t else t for t in free]
    assert got == expected and len(got[2]) <= 9
    assert got == [_reference_greedy(loopy, p, 25, eos) for p in prompts]
    assert stats.accepted > 0
    done: list[int] = []
    greedy_decode(loopy, prompts, 25, eos_id=eos, on_done=lambda i, t: done.append(i))
    assert sorted(done) == [0, 1, 2, 3]
    assert generate(loopy, prompts, 1) == [t[:1] for t in free]


@pytest.fixture(scope="module")
def instruction_test_set(mirror: Path) -> list[list[int]]:
    records = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))
    test = split_instructions(records)["test"]
    tok = Tokenizer.from_dir(mirror / "gpt2")
    return [tok.encode(format_alpaca(r["instruction"], r.get("input", "") or "")) for r in test]


def test_instruction_test_set(instruction_test_set: list[list[int]]) -> None:
    cfg = GPTConfig(context_length=256, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    m = _model(cfg, 4)  # GPT-2 vocabulary, tied: random weights that repeat themselves
    prompts = instruction_test_set
    assert len(prompts) == 110
    plain = greedy_decode(m, prompts, 24, draft=None, batch_size=8)
    fast = greedy_decode(m, prompts, 24, eos_id=50256, batch_size=8)
    cut = [t[: t.index(50256)] if 50256 in t else t for t in plain.tokens]
    assert fast.tokens == cut
    assert fast.stats.accepted > 0 and fast.stats.passes < plain.stats.passes
    some = prompts[::11]
    assert greedy_decode(m, some, 24, eos_id=50256, use_cache=False).tokens == cut[::11]
    assert [generate(m, [p], 24, eos_id=50256)[0] for p in some] == cut[::11]


def test_sampling_decodes_one_token_per_pass(small: GPT) -> None:
    prompts = _prompts(SMALL.vocab_size, 9, [3, 7])

    def sample(draft: str) -> list[list[int]]:
        g = torch.Generator().manual_seed(4)
        return generate(small, prompts, 12, temperature=1.0, generator=g, draft=draft)

    assert sample("prompt_lookup") == sample("none")
    with pytest.raises(ValueError, match="unknown draft"):
        generate(small, prompts, 3, draft="nope")


# --------------------------------------------------------------------------- drafts


def test_prompt_lookup_drafts() -> None:
    idx = PromptLookup(max_ngram=3, min_ngram=1).index([5, 6, 7, 8, 1, 2, 5, 6, 7])
    assert idx.draft(3) == [8, 1, 2]  # "5 6 7" continued with "8 1 2"
    idx.extend([9])
    assert idx.draft(2) == []  # "9" never occurred before
    loop = NgramIndex([1, 2, 3, 1, 2, 3, 1], max_n=2, min_n=1)
    assert loop.draft(7) == [2, 3, 1, 2, 3, 1, 2]  # a period-3 loop drafts the loop
    later = NgramIndex([4, 1, 9, 4, 1, 7, 4, 1], max_n=2, min_n=2)
    assert later.draft(1) == [7]  # the latest occurrence wins
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)
