"""The pretrain stage end to end on a tiny config over a slice of the-verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.errors import ConfigError, DataError
from gpt.recipes.pretrain import PretrainArgs, pretrain, read_text_strict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SLICE_CHARS = 2400


def _args(**kw) -> PretrainArgs:
    base = dict(
        model="tiny",
        # untied head like the reference model (initial loss ~ln(vocab))
        model_overrides={"context_length": 32, "tie_weights": False},
        max_length=32,
        stride=32,
        batch_size=4,
        epochs=3,
        lr=1e-2,
        eval_every=3,
        eval_batches=2,
        sample_tokens=8,
        checkpoint_every=5,
        device="cpu",
    )
    base.update(kw)
    return PretrainArgs(**base)


@pytest.fixture(scope="module")
def verdict_slice(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")[:SLICE_CHARS]
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(verdict_slice: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pretrain")
    rows: list[dict] = []
    samples: list[dict] = []
    res = pretrain(
        verdict_slice,
        tokenizer_dir,
        out,
        _args(),
        on_metrics=rows.extend,
        on_sample=samples.append,
        progress=False,
    )
    return res, rows, samples


def _reference_window_count(n_tokens: int, max_length: int, stride: int) -> int:
    return len(range(0, n_tokens - max_length, stride))


def test_pretrain_end_to_end(full_run, verdict_slice: Path, tokenizer_dir: Path) -> None:
    from gpt.tokenizer import Tokenizer

    res, rows, samples = full_run
    tok = Tokenizer.from_dir(tokenizer_dir)
    text = verdict_slice.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train_ids, val_ids = tok.encode(text[:cut]), tok.encode(text[cut:])

    # data
    assert (res.train_chars, res.val_chars) == (cut, len(text) - cut)
    assert np.load(res.train_tokens_path).tolist() == train_ids
    assert np.load(res.val_tokens_path).tolist() == val_ids
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
    assert final.hparams["max_length"] == 32 and final.hparams["model"] == "tiny"
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


def test_rerun_is_a_noop(full_run, verdict_slice: Path, tokenizer_dir: Path) -> None:
    res, _, _ = full_run
    rows: list[dict] = []
    again = pretrain(
        verdict_slice, tokenizer_dir, res.out_dir, _args(), on_metrics=rows.extend, progress=False
    )
    assert rows == [] and again.resumed_from_step == res.steps
    assert again.final_val_loss == res.final_val_loss and again.metrics == res.metrics


def test_interrupted_pretrain_resumes_to_the_same_weights(
    full_run, verdict_slice: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    res, rows_full, _ = full_run

    class Stop(Exception):
        pass

    def crash(rows: list[dict]) -> None:
        if rows[0]["step"] >= 10:
            raise Stop

    with pytest.raises(Stop):
        pretrain(verdict_slice, tokenizer_dir, tmp_path, _args(), on_metrics=crash, progress=False)
    assert not (tmp_path / "final").exists() and (tmp_path / "last").is_dir()
    rows: list[dict] = []
    resumed = pretrain(
        verdict_slice, tokenizer_dir, tmp_path, _args(), on_metrics=rows.extend, progress=False
    )
    assert resumed.resumed_from_step is not None and 0 < resumed.resumed_from_step < 10
    assert [r for r in rows if r["name"] == "loss"] == [
        r for r in rows_full if r["name"] == "loss" and r["step"] > resumed.resumed_from_step
    ]
    a, b = load_checkpoint(res.final_dir).model, load_checkpoint(resumed.final_dir).model
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_bad_inputs(tmp_path: Path, tokenizer_dir: Path, verdict_slice: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" + b"\xff\xfe broken")
    with pytest.raises(DataError, match=r"bad\.txt.*byte offset 10"):
        read_text_strict(bad)
    with pytest.raises(DataError, match=r"bad\.txt"):
        pretrain(bad, tokenizer_dir, tmp_path / "o1", _args(), progress=False)
    with pytest.raises(DataError, match="not found"):
        read_text_strict(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you. " * 10, encoding="utf-8")
    with pytest.raises(DataError, match=r"short\.txt"):
        pretrain(short, tokenizer_dir, tmp_path / "o2", _args(), progress=False)
    with pytest.raises(ConfigError, match="context length"):
        pretrain(
            verdict_slice, tokenizer_dir, tmp_path / "o3", _args(max_length=64), progress=False
        )
    with pytest.raises(ConfigError, match="unknown pretrain setting"):
        PretrainArgs.from_dict({"epochz": 3})
    assert PretrainArgs.from_dict({"epochs": 3}).train_args().epochs == 3
