"""GPT model: configs, parameter counts, attention variants, KV cache, padding masks."""

from __future__ import annotations

import pytest
import torch

from gpt.errors import ConfigError
from gpt.model import (
    CONFIGS,
    GPT,
    GPTConfig,
    KVCache,
    count_parameters,
    get_config,
    positions_from_mask,
)

TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def gpt2_param_formula(v: int, ctx: int, e: int, layers: int) -> int:
    """GPT-2 parameter count written out by hand (QKV bias, tied head)."""
    per_block = (
        2 * 2 * e  # two LayerNorms
        + e * 3 * e
        + 3 * e  # fused qkv
        + e * e
        + e  # attention out projection
        + e * 4 * e
        + 4 * e  # fc1
        + 4 * e * e
        + e  # fc2
    )
    return v * e + ctx * e + layers * per_block + 2 * e


def test_gpt2_small_count_is_124_439_808() -> None:
    cfg = get_config("gpt2-small")
    assert count_parameters(cfg) == 124_439_808
    assert count_parameters(cfg) == gpt2_param_formula(50257, 1024, 768, 12)
    assert count_parameters(cfg, include_tied_head=True) == 124_439_808 + 50257 * 768


def test_gpt2_medium_count_matches_formula() -> None:
    cfg = get_config("gpt2-medium")
    expected = gpt2_param_formula(50257, 1024, 1024, 24)
    assert expected == 354_823_168
    assert count_parameters(cfg) == expected


def test_count_untied_and_no_bias() -> None:
    cfg = TINY.replace(tie_weights=False)
    m = GPT(cfg)
    assert not m.is_tied
    e, v = cfg.emb_dim, cfg.vocab_size
    with_bias = gpt2_param_formula(v, cfg.context_length, e, cfg.n_layers)
    no_qkv_bias = with_bias - cfg.n_layers * 3 * e
    assert count_parameters(m) == no_qkv_bias + v * e


def test_config_dict_round_trip_and_errors() -> None:
    cfg = get_config("gpt2-small-256")
    assert (cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (256, 768, 12, 12)
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is False
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="gpt2-small"):
        get_config("gpt5")
    assert get_config("124M", drop_rate=0.1).drop_rate == 0.1
    assert get_config("tiny").emb_dim == 32 and get_config("mini").n_layers == 4
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(emb_dim=30, n_heads=4)
    with pytest.raises(ConfigError):
        cfg.replace(nope=3)
    assert {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(CONFIGS)


def test_tied_head_and_shapes() -> None:
    torch.manual_seed(0)
    m = GPT(TINY)
    assert m.out_head.weight is m.tok_emb.weight
    idx = torch.randint(0, TINY.vocab_size, (3, 7))
    assert m(idx).shape == (3, 7, TINY.vocab_size)
    head = m.replace_head(2)
    assert not m.is_tied and head.bias is not None
    assert m(idx).shape == (3, 7, 2)


def _pair(attention_b: str = "explicit", dtype=torch.float32) -> tuple[GPT, GPT]:
    torch.manual_seed(1)
    a = GPT(TINY).to(dtype).eval()
    b = GPT(TINY.replace(attention=attention_b)).to(dtype).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_sdpa_and_explicit_attention_agree() -> None:
    a, b = _pair()
    x = torch.randn(2, 11, TINY.emb_dim)
    att_a, att_b = a.blocks[0].att, b.blocks[0].att
    assert (att_a(x) - att_b(x)).abs().max().item() <= 1e-5
    # full model, float64 to see the algorithmic agreement without float32 noise
    a64, b64 = _pair(dtype=torch.float64)
    idx = torch.randint(0, TINY.vocab_size, (2, 11))
    assert (a64(idx) - b64(idx)).abs().max().item() <= 1e-10
    # also with a padding mask and a cache
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :4] = False
    ca, cb = KVCache.for_model(a64), KVCache.for_model(b64)
    la = a64(idx, attn_mask=mask, kv_cache=ca)
    lb = b64(idx, attn_mask=mask, kv_cache=cb)
    assert (la - lb).abs().max().item() <= 1e-10


def test_causality() -> None:
    a, _ = _pair()
    idx = torch.randint(0, TINY.vocab_size, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % TINY.vocab_size
    with torch.no_grad():
        la, lb = a(idx), a(idx2)
    assert torch.allclose(la[:, :8], lb[:, :8], atol=1e-5)
    assert not torch.allclose(la[:, 8:], lb[:, 8:], atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_kv_cache_matches_full_forward(attention: str) -> None:
    torch.manual_seed(2)
    m = GPT(TINY.replace(attention=attention)).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache.for_model(m)
        parts = [m(idx[:, :9], kv_cache=cache)]
        parts += [m(idx[:, t : t + 1], kv_cache=cache) for t in range(9, 15)]
        parts.append(m(idx[:, 15:], kv_cache=cache))
    assert cache.length == 20
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="context_length"):
        m(torch.zeros(1, TINY.context_length + 1, dtype=torch.long))


def test_left_padding_equals_unpadded() -> None:
    torch.manual_seed(3)
    m = GPT(TINY).eval()
    short = torch.randint(0, TINY.vocab_size, (1, 5))
    long = torch.randint(0, TINY.vocab_size, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:] = short[0]
    batch[1] = long[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1] = True
    assert positions_from_mask(mask)[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    with torch.no_grad():
        lb = m(batch, attn_mask=mask)
        ls, ll = m(short), m(long)
    assert not torch.isnan(lb).any()
    assert (lb[0, 4:] - ls[0]).abs().max().item() <= 1e-4
    assert (lb[1] - ll[0]).abs().max().item() <= 1e-4


def test_dropout_only_in_training() -> None:
    torch.manual_seed(4)
    m = GPT(TINY.replace(drop_rate=0.5))
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    m.train()
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


# --------------------------------------------------------------------------- CPU training attention


@pytest.mark.parametrize(("t", "hd", "p"), [(7, 8, 0.1), (33, 16, 0.5), (64, 64, 0.1)])
def test_causal_attention_cpu_is_sdpa_bit_for_bit(t: int, hd: int, p: float) -> None:
    """The training attention on a CPU (dropout on) gives exactly the outputs and
    gradients of torch's scaled_dot_product_attention, on the same random draws."""
    from torch.nn import functional as F

    from gpt.model import causal_attention_cpu

    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(3, 2, 3, t, hd, generator=g)
    grad_out = torch.randn(2, 3, t, hd, generator=g)
    results = []
    for fn in (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True),
        lambda q, k, v: causal_attention_cpu(q, k, v, p),
    ):
        leaf = qkv.clone().requires_grad_()
        torch.manual_seed(11)
        out = fn(*leaf.unbind(0))
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.equal(out_a, out_b)
    assert torch.equal(grad_a, grad_b)


def test_training_steps_on_cpu_equal_the_sdpa_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole training steps (dropout 0.1): the CPU attention path and torch's SDPA give
    the same losses, gradients and weights, bit for bit."""
    import gpt.model as model_module
    from gpt.lm_step import make_optimizer, train_step
    from gpt.train import LMTrainArgs

    cfg = TINY.replace(drop_rate=0.1)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length + 1), generator=torch.Generator())
    calls = []
    attention = model_module.causal_attention_cpu

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return attention(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(model_module, "causal_attention_cpu", counted)
    runs = []
    for fast in (True, False):
        if not fast:
            assert len(calls) == 3 * cfg.n_layers  # the fast path ran in every layer
            monkeypatch.setattr(model_module, "_math_path_on_cpu", lambda q, p: False)
        torch.manual_seed(3)
        model = GPT(cfg).train()
        opt = make_optimizer(model, LMTrainArgs())
        losses = [train_step(model, opt, x[:, :-1], x[:, 1:])[0] for _ in range(3)]
        grads = [p.grad.clone() for p in model.parameters()]
        runs.append((losses, grads, [p.detach().clone() for p in model.parameters()]))
    (la, ga, wa), (lb, gb, wb) = runs
    assert len(calls) == 3 * cfg.n_layers  # and not in the reference run
    assert la == lb and len(set(la)) == 3
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(wa, wb, strict=True))
