"""The LM training loop: exact resume, learning-rate schedule, clipping, evaluation."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt.data.windows import SlidingWindowDataset, make_loader
from gpt.errors import CheckpointError
from gpt.lm_step import evaluate_lm, lr_at, make_optimizer, perplexity, train_step
from gpt.model import GPT, get_config
from gpt.train import LMTrainArgs, train_lm

CFG = get_config("tiny", vocab_size=96, context_length=16, emb_dim=32, drop_rate=0.1)


def _tokens(n: int = 680, seed: int = 0) -> np.ndarray:
    # a learnable stream: a noisy repeating pattern over 96 ids
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(0, 96, 3), n // 32 + 1)[:n]
    noise = rng.integers(0, 96, n)
    return np.where(rng.random(n) < 0.15, noise, base).astype(np.uint16)


def _loaders(seed: int = 5):
    toks = _tokens()
    split = 580
    train = SlidingWindowDataset(toks[:split], 16, 16)  # 36 windows -> 9 batches of 4
    val = SlidingWindowDataset(toks[split:], 16, 8)
    return (
        make_loader(train, 4, shuffle=True, drop_last=True, seed=seed),
        make_loader(val, 4, shuffle=False, drop_last=False, seed=seed),
    )


def _model(seed: int = 1) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


ARGS = dict(
    epochs=3,
    lr=2e-3,
    eval_every=2,
    eval_batches=2,
    warmup_steps=3,
    cosine=True,
    min_lr=1e-4,
    grad_clip=1.0,
    checkpoint_every=5,
)


def _files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of a checkpoint folder's files, its record.json aside."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "record.json"
    }


def _det(rows: list[dict]) -> list[tuple]:
    """The deterministic part of metrics rows (tokens/s is wall-clock)."""
    return [
        (r["step"], r["epoch"], r["seen"], r["split"], r["name"], r["value"])
        for r in rows
        if r["name"] != "tokens_per_s"
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("full")
    tl, vl = _loaders()
    model = _model()
    rows: list[dict] = []
    res = train_lm(
        model, tl, vl, LMTrainArgs(**ARGS), out_dir=out, on_metrics=rows.extend, progress=False
    )
    return res, rows, {k: v.clone() for k, v in model.state_dict().items()}, out


def test_uninterrupted_run_shape(uninterrupted) -> None:
    res, rows, _, _ = uninterrupted
    assert res.steps == 27 and res.epochs_completed == 3 and res.finished
    assert res.tokens_seen == 27 * 4 * 16
    eval_steps = list(range(1, 28, 2))  # every 2nd from step 1; 27 is also the last
    assert sorted({r["step"] for r in rows}) == eval_steps
    assert len(rows) == 4 * len(eval_steps)
    for step in eval_steps:
        got = {(r["split"], r["name"]) for r in rows if r["step"] == step}
        assert got == {
            ("train", "loss"),
            ("val", "loss"),
            ("train", "lr"),
            ("train", "tokens_per_s"),
        }
    assert {r["epoch"] for r in rows if r["step"] in (1, 9)} == {1}
    assert {r["epoch"] for r in rows if r["step"] == 11} == {2}
    assert all(r["seen"] == r["step"] * 64 for r in rows)
    train_losses = [r["value"] for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert train_losses[0] > math.log(96) - 0.5  # starts near chance
    assert train_losses[-1] < train_losses[0] - 1.0  # and learns the pattern
    assert res.final_val_loss == rows[-3]["value"]
    assert all(r["value"] > 0 for r in rows if r["name"] == "tokens_per_s")
    assert res.metrics == rows


@pytest.mark.parametrize("stop", ["max_steps_mid_epoch", "max_steps_epoch_end", "exception"])
def test_interrupted_and_resumed_equals_uninterrupted(
    uninterrupted, tmp_path: Path, stop: str
) -> None:
    res_full, rows_full, weights_full, out_full = uninterrupted

    class Interrupt(Exception):
        pass

    first: list[dict] = []
    args1 = LMTrainArgs(**ARGS)
    if stop == "max_steps_mid_epoch":
        args1, ckpt_step = args1.replace(max_steps=7), 7
    elif stop == "max_steps_epoch_end":
        args1, ckpt_step = args1.replace(max_steps=9), 9
    else:
        ckpt_step = 20  # last checkpoint (every 5; epoch ends 9, 18) before the crash at 23

    def on_metrics(rows: list[dict]) -> None:
        first.extend(rows)
        if stop == "exception" and rows[0]["step"] == 23:
            raise Interrupt

    tl, vl = _loaders()
    if stop == "exception":
        with pytest.raises(Interrupt):
            train_lm(
                _model(), tl, vl, args1, out_dir=tmp_path, on_metrics=on_metrics, progress=False
            )
    else:
        r1 = train_lm(
            _model(), tl, vl, args1, out_dir=tmp_path, on_metrics=on_metrics, progress=False
        )
        assert r1.steps == ckpt_step and r1.finished

    # resume in a fresh process-like setting: new loaders, differently initialised model,
    # torch's global RNG disturbed
    torch.manual_seed(999)
    tl, vl = _loaders()
    model = _model(seed=42)
    second: list[dict] = []
    res = train_lm(
        model,
        tl,
        vl,
        LMTrainArgs(**ARGS),
        out_dir=tmp_path,
        on_metrics=second.extend,
        progress=False,
    )
    assert res.resumed_from_step == ckpt_step
    assert min(r["step"] for r in second) > ckpt_step  # nothing before the checkpoint again
    combined = [r for r in first if r["step"] <= ckpt_step] + second
    assert _det(combined) == _det(rows_full)
    assert _det(res.metrics) == _det(rows_full)
    assert res.steps == res_full.steps and res.tokens_seen == res_full.tokens_seen
    state = model.state_dict()
    assert state.keys() == weights_full.keys()
    for k, v in weights_full.items():
        assert torch.equal(state[k], v), k
    # the resumable checkpoint too, byte for byte: weights, optimizer state, trainer state
    # (the wall-clock part, record.json, aside; it is read back on resume)
    assert _files(tmp_path / "last") == _files(out_full / "last")
    assert sorted(_files(out_full / "last")) == [
        "config.json", "hparams.json", "manifest.json", "meta.json", "model.safetensors",
        "optimizer.pt", "trainer_state.json", "trainer_tensors.safetensors",
    ]  # fmt: skip
    assert res.train_seconds > 0
    speeds = [r for r in res.metrics if r["name"] == "tokens_per_s"]
    assert len(speeds) == len([r for r in rows_full if r["name"] == "tokens_per_s"])

    # a finished run resumes to a no-op
    again: list[dict] = []
    res3 = train_lm(
        _model(seed=3),
        *_loaders(),
        LMTrainArgs(**ARGS),
        out_dir=tmp_path,
        on_metrics=again.extend,
        progress=False,
    )
    assert again == [] and res3.steps == 27 and _det(res3.metrics) == _det(rows_full)


def test_progress_reports_the_steps_the_loop_takes() -> None:
    """``on_progress(done, total)`` follows the optimizer steps with the total the loop
    itself takes — full batches only (the loader drops a last partial one) × epochs,
    capped by ``max_steps`` — so a caller never derives that count (rounding up there
    left the bar short of 100 %)."""
    train = SlidingWindowDataset(_tokens()[:580], 16, 14)
    assert len(train) % 4  # a last partial batch, dropped by the loader
    tl = make_loader(train, 4, shuffle=True, drop_last=True, seed=5)
    _, vl = _loaders()
    for max_steps, steps in ((None, 2 * (len(train) // 4)), (5, 5)):
        calls: list[tuple[int, int]] = []
        args = LMTrainArgs(epochs=2, eval_every=100, eval_batches=1, max_steps=max_steps)
        res = train_lm(
            _model(), tl, vl, args, on_progress=lambda *dt, c=calls: c.append(dt), progress=False
        )
        assert res.steps == steps
        assert calls == [(done, steps) for done in range(steps + 1)]


def test_resume_refuses_changed_data(uninterrupted, tmp_path: Path) -> None:
    tl, vl = _loaders()
    train_lm(
        _model(), tl, vl, LMTrainArgs(**{**ARGS, "max_steps": 2}), out_dir=tmp_path, progress=False
    )
    other = make_loader(SlidingWindowDataset(_tokens(), 16, 16), 4, shuffle=True, drop_last=True)
    with pytest.raises(CheckpointError, match="steps per epoch"):
        train_lm(_model(), other, vl, LMTrainArgs(**ARGS), out_dir=tmp_path, progress=False)
    # resume=False starts over
    res = train_lm(
        _model(),
        other,
        vl,
        LMTrainArgs(**{**ARGS, "max_steps": 1}),
        out_dir=tmp_path,
        resume=False,
        progress=False,
    )
    assert res.resumed_from_step is None and res.steps == 1


def test_lr_schedule_matches_formula() -> None:
    peak, lo, warm, start = 1e-3, 1e-5, 4, 3e-5
    tl, vl = _loaders()
    total = 2 * len(tl)
    args = LMTrainArgs(
        epochs=2,
        lr=peak,
        min_lr=lo,
        warmup_steps=warm,
        cosine=True,
        eval_every=1,
        eval_batches=1,
    )
    rows: list[dict] = []
    train_lm(_model(), tl, vl, args, on_metrics=rows.extend, progress=False)
    lrs = {r["step"]: r["value"] for r in rows if r["name"] == "lr"}
    assert sorted(lrs) == list(range(1, total + 1))
    for step, value in lrs.items():
        t = step - 1
        if t < warm:
            expected = start + t * (peak - start) / warm
        else:
            expected = lo + (peak - lo) * 0.5 * (
                1 + math.cos(math.pi * (t - warm) / (total - warm))
            )
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs[1] == pytest.approx(start)
    assert lrs[warm + 1] == pytest.approx(peak)
    # no schedule: constant
    flat = LMTrainArgs(lr=peak)
    assert {lr_at(s, flat, 100) for s in range(100)} == {peak}
    # cosine without warmup ends at min_lr
    cos = LMTrainArgs(lr=peak, min_lr=lo, cosine=True)
    assert lr_at(0, cos, 11) == pytest.approx(peak)
    assert lr_at(10, cos, 11) == pytest.approx(
        lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * 10 / 11))
    )


def test_lr_is_applied_to_the_optimizer() -> None:
    # first warmup step with start lr 0: AdamW (decoupled decay scaled by lr) changes nothing
    tl, vl = _loaders()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = LMTrainArgs(warmup_steps=5, warmup_start_lr=0.0, max_steps=1)
    train_lm(model, tl, vl, args, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    args = LMTrainArgs(max_steps=1)
    train_lm(model, tl, vl, args, progress=False)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grad_clipping_bounds_the_norm() -> None:
    cfg = CFG.replace(drop_rate=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 96, (4, 16))
    y = torch.randint(0, 96, (4, 16))
    opt = make_optimizer(model, LMTrainArgs(lr=0.0, weight_decay=0.0))

    # unclipped reference gradients, computed independently
    model.zero_grad()
    F.cross_entropy(model(x).reshape(-1, 96), y.reshape(-1)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref.values()))
    assert ref_norm > 0.5

    _, norm = train_step(model, opt, x, y, lr=0.0, grad_clip=0.25)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    clipped = {n: p.grad for n, p in model.named_parameters()}
    clipped_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in clipped.values()))
    assert clipped_norm <= 0.25 * (1 + 1e-5)
    assert clipped_norm == pytest.approx(0.25, rel=1e-4)
    for n, g in clipped.items():
        torch.testing.assert_close(g, ref[n] * (0.25 / ref_norm), rtol=1e-4, atol=1e-8)

    _, norm = train_step(model, opt, x, y, lr=0.0, grad_clip=1e6)  # no-op clip
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-8)
    assert train_step(model, opt, x, y, lr=0.0)[1] is None


def test_evaluate_and_perplexity_match_manual_computation() -> None:
    _, vl = _loaders()
    model = _model()
    model.train()
    batches = list(vl)
    assert len(batches) == 3 and len(batches[-1][0]) == 3  # 11 windows, batch 4
    with torch.no_grad():
        model.eval()
        per_batch, nll, count = [], 0.0, 0
        for xb, yb in batches:
            logp = torch.log_softmax(model(xb).double(), dim=-1)
            tok = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
            per_batch.append(float(tok.mean()))
            nll += float(tok.sum())
            count += yb.numel()
        model.train()
    assert evaluate_lm(model, vl, 2) == pytest.approx(sum(per_batch[:2]) / 2, rel=1e-5)
    assert evaluate_lm(model, vl) == pytest.approx(sum(per_batch) / 3, rel=1e-5)
    assert evaluate_lm(model, vl, 10) == pytest.approx(sum(per_batch) / 3, rel=1e-5)
    assert perplexity(model, vl) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert model.training  # restored
    empty = make_loader(SlidingWindowDataset(np.arange(5), 16, 16), 4, False, False)
    assert math.isnan(evaluate_lm(model, empty, 5))
    assert math.isnan(perplexity(model, empty))
