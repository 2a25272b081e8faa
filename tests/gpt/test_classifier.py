"""Spam classifier: frozen-prefix caching == full forward, metrics, checkpoint, CLI."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from gpt.architecture import get_config
from gpt.args import SpamArgs
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.data.parsing import balance_and_split_spam, parse_sms
from gpt.model import GPT
from gpt.recipes.classifier import finetune_classifier
from gpt.recipes.classifier_model import build_classifier, classify, encode_spam
from gpt.tokenizer import Tokenizer

FINAL = ["accuracy", "precision", "recall", "f1", "tn", "fp", "fn", "tp"]


@pytest.fixture(scope="module")
def sms_slice(mirror: Path) -> dict[str, tuple[list[str], list[int]]]:
    parts = balance_and_split_spam(parse_sms(mirror / "sms+spam+collection.zip"), seed=123)
    sizes = {"train": 40, "val": 12, "test": 16}
    return {
        k: ([r.text for r in parts[k][:n]], [int(r.label == "spam") for r in parts[k][:n]])
        for k, n in sizes.items()
    }


@pytest.fixture(scope="module")
def tok(mirror: Path) -> Tokenizer:
    return Tokenizer.from_dir(mirror / "gpt2")


def _base_ckpt(path: Path, tokenizer_dir: Path, n_layers: int = 3, drop: float = 0.1) -> Path:
    torch.manual_seed(7)
    cfg = get_config("tiny", n_layers=n_layers, drop_rate=drop, context_length=64)
    return save_checkpoint(path, GPT(cfg), tokenizer_dir=tokenizer_dir)


def test_encode_spam_pads_and_truncates(tok: Tokenizer) -> None:
    ids = encode_spam(["Hello, world", "x " * 50], tok, 8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [15496, 11, 995] + [50256] * 5
    assert ids[1].tolist() == tok.encode("x " * 50)[:8]


def test_build_classifier_freezes_all_but_suffix() -> None:
    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_layers=3))
    emb_before = model.tok_emb.weight.clone()
    build_classifier(model, 2, trainable_blocks=2, train_final_norm=True, seed=5)
    assert model.out_head.out_features == 2 and model.out_head.bias is not None
    assert torch.equal(model.tok_emb.weight, emb_before)  # untied, embedding untouched
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("blocks.1.", "blocks.2.", "final_norm.", "out_head."))
    }
    assert trainable == expected
    # the head is seeded: same seed, same weights; the global RNG is left alone
    other = GPT(get_config("tiny", n_layers=3))
    state = torch.random.get_rng_state()
    build_classifier(other, 2, trainable_blocks=0, train_final_norm=False, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(other.out_head.weight, model.out_head.weight)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        "out_head.weight",
        "out_head.bias",
    }


@pytest.mark.parametrize(
    ("trainable_blocks", "pool", "drop"), [(1, "last", 0.0), (2, "last_real", 0.1)]
)
def test_prefix_cache_matches_full_forward(
    tmp_path: Path, tokenizer_dir: Path, sms_slice, trainable_blocks: int, pool: str, drop: float
) -> None:
    base = _base_ckpt(tmp_path / "base", tokenizer_dir)
    results = {}
    for cached in (True, False):
        args = SpamArgs(
            trainable_blocks=trainable_blocks,
            epochs=2,
            batch_size=8,
            lr=1e-3,
            max_length=48,
            pool=pool,  # type: ignore[arg-type]
            drop_rate=drop,
            prefix_cache=cached,
        )
        results[cached] = finetune_classifier(
            base, sms_slice, args, out_dir=tmp_path / f"clf{cached}", progress=False
        )
    a, b = results[True]["step_losses"], results[False]["step_losses"]
    assert len(a) == len(b) == 2 * (40 // 8)
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    assert diff <= 1e-5, diff
    assert len(set(a)) > 1  # it trains: losses change from step to step
    ca = load_checkpoint(tmp_path / "clfTrue").model.state_dict()
    cb = load_checkpoint(tmp_path / "clfFalse").model.state_dict()
    for k in ca:
        assert torch.allclose(ca[k], cb[k], atol=1e-5), k
    assert results[True]["final"] == results[False]["final"]


def test_finetune_metrics_checkpoint_and_classify(
    tmp_path: Path, tokenizer_dir: Path, sms_slice, tok: Tokenizer
) -> None:
    base = _base_ckpt(tmp_path / "base", tokenizer_dir, drop=0.0)
    rows: list[dict] = []
    args = SpamArgs(epochs=2, lr=1e-3, max_length=None)
    res = finetune_classifier(
        base, sms_slice, args, out_dir=tmp_path / "clf", on_metrics=rows.extend, progress=False
    )
    longest = max(len(tok.encode(t)) for t in sms_slice["train"][0])
    assert res["max_length"] == min(longest, 64)
    for r in rows:
        assert set(r) == {"step", "epoch", "seen", "split", "name", "value"}
    per_epoch = [r for r in rows if r["name"] in ("loss", "accuracy")]
    assert len(per_epoch) == 2 * 3 * 2
    assert {(r["epoch"], r["seen"]) for r in per_epoch} == {(1, 40), (2, 80)}
    final = {(r["split"], r["name"]): r["value"] for r in rows if r["name"].startswith("final_")}
    assert len(final) == 3 * len(FINAL)
    for split, (texts, labels) in sms_slice.items():
        m = {k: final[(split, f"final_{k}")] for k in FINAL}
        assert m["tn"] + m["fp"] + m["fn"] + m["tp"] == len(texts)
        assert m["tp"] + m["fn"] == sum(labels)
        assert m["accuracy"] == pytest.approx((m["tn"] + m["tp"]) / len(texts))
        assert res["final"][split]["accuracy"] == pytest.approx(m["accuracy"])
    # last epoch's per-epoch accuracy equals the final accuracy
    for split in sms_slice:
        last = [r for r in per_epoch if r["split"] == split and r["name"] == "accuracy"][-1]
        assert last["value"] == pytest.approx(final[(split, "final_accuracy")])
    assert set(res["timings"]) >= {"load_s", "prefix_cache_s", "train_s", "eval_s", "total_s"}
    # per-example predictions of the final model: every message of every split, in order
    preds = res["predictions"]
    assert len(preds) == sum(len(t) for t, _ in sms_slice.values())
    for split, (texts, labels) in sms_slice.items():
        rows = [p for p in preds if p["split"] == split]
        assert [p["example_id"] for p in rows] == list(range(len(texts)))
        assert [p["label"] for p in rows] == ["spam" if y else "ham" for y in labels]
        assert all((p["prediction"] == "spam") == (p["prob_spam"] > 0.5) for p in rows)
        tp = sum(p["label"] == p["prediction"] == "spam" for p in rows)
        ok = sum(p["label"] == p["prediction"] for p in rows)
        assert tp == final[(split, "final_tp")]
        assert ok / len(rows) == pytest.approx(final[(split, "final_accuracy")])

    # the checkpoint: a classifier with labels; classify() reproduces the test metrics
    loaded = load_checkpoint(tmp_path / "clf")
    assert loaded.kind == "classifier" and loaded.num_classes == 2
    assert loaded.labels == ["ham", "spam"]
    assert loaded.meta["max_length"] == res["max_length"] and loaded.meta["pool"] == "last"
    texts, labels = sms_slice["test"]
    out = classify(tmp_path / "clf", texts)
    assert all(lab in ("ham", "spam") and 0.0 <= p <= 1.0 for lab, p in out)
    # the stored predictions are the saved classifier's
    test_preds = [p for p in preds if p["split"] == "test"]
    assert [lab for lab, _ in out] == [p["prediction"] for p in test_preds]
    assert [q for _, q in out] == pytest.approx([p["prob_spam"] for p in test_preds], abs=1e-5)
    assert all((lab == "spam") == (p > 0.5) for lab, p in out)
    acc = sum(int((lab == "spam") == bool(y)) for (lab, _), y in zip(out, labels, strict=True))
    assert acc / len(labels) == pytest.approx(final[("test", "final_accuracy")])


def test_finetune_rejects_bad_inputs(tmp_path: Path, tokenizer_dir: Path, sms_slice) -> None:
    from gpt.errors import ConfigError, DataError

    base = _base_ckpt(tmp_path / "base", tokenizer_dir)
    with pytest.raises(DataError, match="train"):
        finetune_classifier(base, {"test": sms_slice["test"]}, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="trainable_blocks"):
        finetune_classifier(
            base, sms_slice, SpamArgs(trainable_blocks=9), out_dir=tmp_path / "x", progress=False
        )
    with pytest.raises(ConfigError):
        SpamArgs(pool="first")  # type: ignore[arg-type]


def test_cli_classify(tmp_path: Path, tokenizer_dir: Path) -> None:
    from flows.cli import main

    torch.manual_seed(3)
    model = GPT(get_config("tiny", drop_rate=0.0))
    build_classifier(model, 2)
    ckpt = save_checkpoint(
        tmp_path / "clf",
        model,
        tokenizer_dir=tokenizer_dir,
        meta={"labels": ["ham", "spam"], "max_length": 16, "pool": "last"},
    )
    texts = ["WINNER!! Claim your free prize now", "see you at lunch"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["classify", "--checkpoint", str(ckpt), *texts]) == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2
    expected = classify(ckpt, texts)
    for line, text, (label, prob) in zip(lines, texts, expected, strict=True):
        got_label, got_prob, got_text = line.split("\t")
        assert got_label == label and got_text == text
        assert float(got_prob.split("=")[1]) == pytest.approx(prob, abs=1e-4)
    # independent check of the probability: softmax of the last padded position
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = encode_spam(texts, tok, 16)
    with torch.no_grad():
        p = torch.softmax(load_checkpoint(ckpt).model(ids)[:, -1], -1)[:, 1]
    assert [e[1] for e in expected] == pytest.approx(p.tolist(), abs=1e-6)

    # an LM checkpoint is refused with a clear message
    lm = save_checkpoint(tmp_path / "lm", GPT(get_config("tiny")), tokenizer_dir=tokenizer_dir)
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["classify", "--checkpoint", str(lm), "hello"]) == 1
    assert "not a spam classifier" in err.getvalue() and str(lm) in err.getvalue()


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_last_block_at_the_pooled_position_equals_the_full_block(attention: str) -> None:
    """The cached path runs the last trainable block at the pooled position only; its
    output, and the gradients it sends back, equal the full block's at that position."""
    from gpt.recipes.classifier_model import block_at as _block_at

    torch.manual_seed(0)
    cfg = get_config("tiny", attention=attention, drop_rate=0.0)
    block = GPT(cfg).blocks[-1]
    x = torch.randn(5, 12, cfg.emb_dim, requires_grad=True)
    where = torch.tensor([11, 3, 0, 7, 11])  # last position, padded rows, the first token
    full = block(x)[torch.arange(5), where]
    fast = _block_at(block, x, where)
    assert torch.allclose(fast, full, atol=1e-5), (fast - full).abs().max()
    g_full = torch.autograd.grad(full.square().sum(), [x, *block.parameters()])
    g_fast = torch.autograd.grad(fast.square().sum(), [x, *block.parameters()])
    for a, b in zip(g_fast, g_full, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("max_length", [None, 80])
def test_a_default_max_length_capped_at_the_context_is_no_warning(
    tmp_path: Path, tokenizer_dir: Path, sms_slice, max_length: int | None, caplog
) -> None:
    """The smoke profile logged "max_length 87 exceeds the context length 64" on every
    run, about its own default (the longest message, capped at the context: documented).
    Only a max_length the user set beyond the context is worth a warning."""
    import logging

    base = _base_ckpt(tmp_path / "base", tokenizer_dir, n_layers=1)
    args = SpamArgs(trainable_blocks=1, epochs=1, batch_size=20, max_length=max_length)
    train = {"train": sms_slice["train"], "val": sms_slice["val"]}
    tok = Tokenizer.from_dir(tokenizer_dir)  # once: each build parses the BPE files (~0.2 s)
    longest = max(len(tok.encode(t)) for t in train["train"][0])
    assert longest > 64  # the slice holds a message longer than the context
    with caplog.at_level(logging.INFO, logger="gpt"):
        res = finetune_classifier(base, train, args, out_dir=tmp_path / "clf", progress=False)
    assert res["max_length"] == 64
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    capped = [r.getMessage() for r in caplog.records if "context length 64" in r.getMessage()]
    assert len(capped) == 1, caplog.text
    if max_length is None:
        assert warned == [], warned
    else:
        assert any("max_length 80 exceeds the context length 64" in m for m in warned), warned


def test_fused_adamw_keeps_the_plain_results(
    tmp_path: Path, tokenizer_dir: Path, sms_slice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finetune steps with torch's fused AdamW (one pass per tensor instead of about
    ten): per-step losses within float rounding of the plain implementation's, the same
    predictions and metrics on every split."""
    import gpt.recipes.classifier as clf
    from gpt.lm_step import adamw

    base = _base_ckpt(tmp_path / "base", tokenizer_dir, drop=0.0)
    args = SpamArgs(epochs=2, batch_size=8, lr=1e-3, max_length=48)
    made: list[bool] = []
    results = {}
    for fused in (True, False):

        def optimizer(params, lr, weight_decay, fused=fused):
            opt = adamw(params, lr, weight_decay, fused)
            made.append(bool(opt.defaults.get("fused")))
            return opt

        monkeypatch.setattr(clf, "adamw", optimizer)
        results[fused] = finetune_classifier(
            base, sms_slice, args, out_dir=tmp_path / f"clf{fused}", progress=False
        )
    assert made == [True, False]
    a, b = results[True]["step_losses"], results[False]["step_losses"]
    assert len(a) == len(b) == 2 * (40 // 8) and len(set(a)) > 1
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5
    assert results[True]["predictions"] == results[False]["predictions"] or all(
        (p["label"], p["prediction"]) == (q["label"], q["prediction"])
        and abs(p["prob_spam"] - q["prob_spam"]) <= 1e-5
        for p, q in zip(results[True]["predictions"], results[False]["predictions"], strict=True)
    )
    assert results[True]["final"] == results[False]["final"]
