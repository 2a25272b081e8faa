"""Generation: KV cache == no cache, batched == one-by-one, EOS, sampling, cropping."""

from __future__ import annotations

import pytest
import torch

from gpt.generate import generate, sample_next
from gpt.model import GPT, GPTConfig

CFG = GPTConfig(
    vocab_size=97,
    context_length=32,
    emb_dim=32,
    n_heads=4,
    n_layers=2,
    drop_rate=0.0,
    tie_weights=False,
)  # untied: random tied models tend to repeat one token


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(10)
    return GPT(CFG).eval()


def _reference_greedy(m: GPT, prompt: list[int], n: int) -> list[int]:
    """The plain loop: full forward on the (cropped) sequence, argmax, append."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            window = torch.tensor([seq[-CFG.context_length :]])
            nxt = int(m(window)[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


PROMPTS = [[5, 17, 3], [40, 2, 9, 88, 61, 7, 7, 12], [1], [33, 34, 35, 36, 37]]


@pytest.mark.parametrize("n_new", [10, 40])  # 40: runs past the 32-token context
def test_cache_equals_no_cache_and_reference(model: GPT, n_new: int) -> None:
    for p in PROMPTS:
        ref = _reference_greedy(model, p, n_new)
        assert len(set(ref)) > 2  # the test model does not just repeat one token
        assert generate(model, [p], n_new, use_cache=True) == [ref]
        assert generate(model, [p], n_new, use_cache=False) == [ref]


def test_sampling_cache_equals_no_cache(model: GPT) -> None:
    for p in PROMPTS:
        a = generate(
            model,
            [p],
            30,
            temperature=1.3,
            top_k=20,
            use_cache=True,
            generator=torch.Generator().manual_seed(7),
        )
        b = generate(
            model,
            [p],
            30,
            temperature=1.3,
            top_k=20,
            use_cache=False,
            generator=torch.Generator().manual_seed(7),
        )
        assert a == b


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("n_new", [12, 35])
def test_batched_equals_one_by_one(model: GPT, use_cache: bool, n_new: int) -> None:
    batched = generate(model, PROMPTS, n_new, use_cache=use_cache)
    single = [generate(model, [p], n_new, use_cache=use_cache)[0] for p in PROMPTS]
    assert batched == single
    assert [len(x) for x in batched] == [n_new] * len(PROMPTS)


def test_eos_stops_each_row(model: GPT) -> None:
    full = [_reference_greedy(model, p, 15) for p in PROMPTS]
    eos = full[1][6]  # a token that the second prompt produces at step 7
    got = generate(model, PROMPTS, 15, eos_id=eos)
    for ref, g in zip(full, got, strict=True):
        expected = ref[: ref.index(eos)] if eos in ref else ref
        assert g == expected
    assert len(got[1]) <= 6


def test_tensor_input_and_long_prompt_cropped(model: GPT) -> None:
    long_prompt = list(range(60))  # longer than the context: keep the last 32
    assert generate(model, torch.tensor([long_prompt]), 5) == [
        _reference_greedy(model, long_prompt[-32:], 5)
    ]
    assert generate(model, [[1, 2]], 0) == [[]]
    with pytest.raises(ValueError):
        generate(model, [[]], 3)


def test_top_k_one_is_greedy_and_training_flag_restored(model: GPT) -> None:
    model.train()
    try:
        g = generate(
            model,
            PROMPTS[:2],
            10,
            temperature=0.8,
            top_k=1,
            generator=torch.Generator().manual_seed(0),
        )
        assert model.training
    finally:
        model.eval()
    assert g == [_reference_greedy(model, p, 10) for p in PROMPTS[:2]]


def test_seeded_sampling_reproducible(model: GPT) -> None:
    def run(seed: int) -> list[list[int]]:
        return generate(
            model, PROMPTS, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sample_next_top_k_distribution() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 1.5, 0.5]]).repeat(20000, 1)
    draws = sample_next(
        logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1)
    )
    counts = torch.bincount(draws, minlength=6).double() / len(draws)
    assert set(draws.unique().tolist()) == {1, 2, 4}
    top = torch.tensor([2.0, 1.0, 1.5]).double()
    expected = torch.softmax(top, 0)
    assert torch.allclose(counts[[1, 2, 4]], expected, atol=0.015)
    # temperature 0.5 sharpens: p ∝ exp(2 * logit)
    draws = sample_next(
        logits, temperature=0.5, top_k=3, generator=torch.Generator().manual_seed(2)
    )
    counts = torch.bincount(draws, minlength=6).double() / len(draws)
    assert torch.allclose(counts[[1, 2, 4]], torch.softmax(top / 0.5, 0), atol=0.015)
    assert sample_next(logits[:2]).tolist() == [1, 1]
