"""Opt-in int8 weights (gpt.quantize): close to fp32, never touching the fp32 model, and
decoded exactly (drafted, batched and plain int8 decoding agree token for token)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from gpt.architecture import GPTConfig
from gpt.decode import greedy_decode, row_plan
from gpt.model import GPT
from gpt.quantize import Int8Linear, quantize_int8, with_weights

CFG = GPTConfig(
    vocab_size=211, context_length=48, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0
)  # tied: greedy text loops, so drafts get accepted


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(3)
    return GPT(CFG).eval()


def test_int8_linear_close_to_fp32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8Linear(lin)
    assert q.weight_q.dtype == torch.int8 and q.weight_scale.shape == (40,)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # 8-bit rounding, not more
    # each row's result does not depend on the other rows of the call
    rows = torch.cat([q(x.reshape(10, 96)[i : i + 1]) for i in range(10)])
    assert torch.equal(rows, q(x.reshape(10, 96)))


def test_quantized_copy_leaves_fp32_alone(model: GPT) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert model.is_tied  # the head of the copy gets its own int8 weights:
    assert isinstance(q.out_head, Int8Linear) and isinstance(q.blocks[0].att.qkv, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert with_weights(model, "fp32") is model
    with pytest.raises(ValueError, match="unknown weights"):
        with_weights(model, "int4")
    x = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(x)
        assert (q(x) - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8_decoding_is_exact(model: GPT) -> None:
    q = quantize_int8(model)
    assert row_plan(q).multi
    rng = random.Random(2)
    prompts = [[rng.randrange(CFG.vocab_size) for _ in range(n)] for n in (2, 5, 9, 30)]
    plain = greedy_decode(q, prompts, 30, draft=None)
    drafted = greedy_decode(q, prompts, 30)
    alone = [greedy_decode(q, [p], 30).tokens[0] for p in prompts]
    rebuilt = greedy_decode(q, prompts, 30, use_cache=False)
    assert drafted.tokens == plain.tokens == alone == rebuilt.tokens
    assert drafted.stats.accepted > 0
