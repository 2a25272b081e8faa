"""The pretrain stage end to end on a tiny config over a slice of the-verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.data.windows import tokenize_to_npy
from gpt.errors import ConfigError, DataError
from gpt.recipes.pretrain import ModelSpec, PretrainArgs, pretrain
from gpt.tokenizer import Tokenizer

SLICE_CHARS = 2400


def _args(**kw) -> PretrainArgs:
    base = dict(
        # untied head like the reference model (initial loss ~ln(vocab))
        model=ModelSpec(name="tiny", overrides={"context_length": 32, "tie_weights": False}),
        batch_size=4,
        epochs=3,
        lr=1e-2,
        eval_every=3,
        eval_batches=2,
        sample_tokens=8,
        checkpoint_every=5,
    )
    base.update(kw)
    return PretrainArgs(**base)


def _tokens(text: str, tokenizer_dir: Path, folder: Path) -> tuple[Path, Path]:
    """The 90/10 character split of ``text`` as train/val token files."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    cut = int(0.9 * len(text))
    tr = tokenize_to_npy(text[:cut], tok, folder / "train.npy").path
    va = tokenize_to_npy(text[cut:], tok, folder / "val.npy").path
    return tr, va


def _run(tokens: tuple[Path, Path], tokenizer_dir: Path, out: Path, args=None, **kw):
    return pretrain(
        *tokens, tokenizer_dir, out, args or _args(), max_length=32, stride=32, device="cpu",
        progress=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def verdict_text(mirror: Path) -> str:
    return (mirror / "the-verdict.txt").read_text(encoding="utf-8")[:SLICE_CHARS]


@pytest.fixture(scope="module")
def verdict_tokens(
    verdict_text: str, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    return _tokens(verdict_text, tokenizer_dir, tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def full_run(verdict_tokens, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pretrain")
    rows: list[dict] = []
    samples: list[dict] = []
    res = _run(verdict_tokens, tokenizer_dir, out, on_metrics=rows.extend, on_sample=samples.append)
    return res, rows, samples


def _reference_window_count(n_tokens: int, max_length: int, stride: int) -> int:
    return len(range(0, n_tokens - max_length, stride))


def test_pretrain_end_to_end(full_run, verdict_text: str, tokenizer_dir: Path) -> None:
    res, rows, samples = full_run
    tok = Tokenizer.from_dir(tokenizer_dir)
    cut = int(0.9 * len(verdict_text))
    train_ids, val_ids = tok.encode(verdict_text[:cut]), tok.encode(verdict_text[cut:])

    # data: the windows over the token files it was given
    assert (res.train_tokens, res.val_tokens) == (len(train_ids), len(val_ids))
    assert res.train_windows == _reference_window_count(len(train_ids), 32, 32)
    assert res.val_windows == _reference_window_count(len(val_ids), 32, 32)
    steps_per_epoch = res.train_windows // 4  # drop_last
    assert res.steps == 3 * steps_per_epoch and res.epochs == 3
    assert res.tokens_seen == res.steps * 4 * 32

    # metrics: 4 rows per eval step (steps 1, 4, 7, ... and the last)
    eval_steps = sorted({*range(1, res.steps + 1, 3), res.steps})
    assert sorted({r["step"] for r in rows}) == eval_steps
    assert len(rows) == 4 * len(eval_steps)
    names = sorted({(r["split"], r["name"]) for r in rows})
    assert names == [("train", "loss"), ("train", "lr"), ("train", "tokens_per_s"), ("val", "loss")]
    assert all(r["value"] == pytest.approx(1e-2) for r in rows if r["name"] == "lr")
    assert rows == res.metrics
    train_loss = [r["value"] for r in rows if r["split"] == "train" and r["name"] == "loss"]
    val_loss = [r["value"] for r in rows if r["split"] == "val" and r["name"] == "loss"]
    assert train_loss[0] == pytest.approx(math.log(50257), abs=0.6)  # ~10.8 at the start
    assert train_loss[-1] < train_loss[0] - 2.0
    assert min(val_loss) < val_loss[0] - 1.0
    assert res.final_train_loss == train_loss[-1] and res.final_val_loss == val_loss[-1]

    # one greedy sample per epoch, through the callback and in the result
    assert samples == res.samples
    assert [s["epoch"] for s in samples] == [1, 2, 3]
    assert [s["step"] for s in samples] == [steps_per_epoch * e for e in (1, 2, 3)]
    for s in samples:
        assert s["prompt"] == "Every effort moves you"
        assert s["text"].startswith("Every effort moves you")
        assert len(tok.encode(s["text"])) > len(tok.encode(s["prompt"]))

    # final checkpoint with tokenizer files, equal to the resumable one
    final = load_checkpoint(res.final_dir)
    assert final.config.to_dict() == res.config and final.config.context_length == 32
    assert final.tokenizer_dir is not None
    assert (final.tokenizer_dir / "vocab.bpe").read_bytes() == (
        tokenizer_dir / "vocab.bpe"
    ).read_bytes()
    assert final.hparams["model"]["name"] == "tiny"
    assert final.meta["max_length"] == 32 and final.meta["stride"] == 32
    assert final.meta["train_windows"] == res.train_windows
    last = load_checkpoint(res.last_dir)
    for k, v in final.model.state_dict().items():
        assert torch.equal(v, last.model.state_dict()[k]), k

    # loss curve
    png = res.loss_png
    assert png == res.out_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (400, 600)

    d = res.to_dict()
    json.dumps(d)
    assert "metrics" not in d and d["final_dir"] == str(res.final_dir)


def test_rerun_is_a_noop(full_run, verdict_tokens, tokenizer_dir: Path) -> None:
    res, _, _ = full_run
    rows: list[dict] = []
    again = _run(verdict_tokens, tokenizer_dir, res.out_dir, on_metrics=rows.extend)
    assert rows == [] and again.resumed_from_step == res.steps
    assert again.final_val_loss == res.final_val_loss and again.metrics == res.metrics


def test_interrupted_pretrain_resumes_to_the_same_weights(
    full_run, verdict_tokens, tokenizer_dir: Path, tmp_path: Path
) -> None:
    res, rows_full, _ = full_run

    class Stop(Exception):
        pass

    def crash(rows: list[dict]) -> None:
        if rows[0]["step"] >= 10:
            raise Stop

    with pytest.raises(Stop):
        _run(verdict_tokens, tokenizer_dir, tmp_path, on_metrics=crash)
    assert not (tmp_path / "final").exists() and (tmp_path / "last").is_dir()
    rows: list[dict] = []
    resumed = _run(verdict_tokens, tokenizer_dir, tmp_path, on_metrics=rows.extend)
    assert resumed.resumed_from_step is not None and 0 < resumed.resumed_from_step < 10
    assert [r for r in rows if r["name"] == "loss"] == [
        r for r in rows_full if r["name"] == "loss" and r["step"] > resumed.resumed_from_step
    ]
    a, b = load_checkpoint(res.final_dir).model, load_checkpoint(resumed.final_dir).model
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_bad_inputs(tmp_path: Path, tokenizer_dir: Path, verdict_tokens) -> None:
    short = _tokens("Every effort moves you. " * 10, tokenizer_dir, tmp_path / "short")
    with pytest.raises(DataError, match=r"short/train\.npy.*fewer than one batch"):
        _run(short, tokenizer_dir, tmp_path / "o2")
    with pytest.raises(ConfigError, match="context length"):
        pretrain(
            *verdict_tokens, tokenizer_dir, tmp_path / "o3", _args(), max_length=64, stride=64,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="epochz"):
        PretrainArgs.model_validate({"epochz": 3})
    with pytest.raises(ConfigError, match="epochz"):
        PretrainArgs(epochz=3)
    assert PretrainArgs.model_validate({"model": {"name": "tiny"}}).model.name == "tiny"
