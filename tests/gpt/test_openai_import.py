"""Import of OpenAI's GPT-2 TF checkpoint layout, checked against an independent NumPy
GPT-2 forward pass computed from the raw TF arrays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _ci import DevModule
from helpers_openai import openai_arrays, write_openai_checkpoint

from gpt.errors import CheckpointError

tf = DevModule("tensorflow", "it writes and reads the TF checkpoints (make setup)")

HP = {"n_vocab": 61, "n_ctx": 24, "n_embd": 16, "n_head": 4, "n_layer": 2}


# ---------------------------------------------------------------- independent reference


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_gpt2_logits(ids: list[int], w: dict[str, np.ndarray], hp: dict) -> np.ndarray:
    """GPT-2 forward in float64 NumPy from the raw TF arrays (Conv1D: x @ w[0] + b)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t, e, nh = len(ids), hp["n_embd"], hp["n_head"]
    hd = e // nh
    x = w["model/wte"][ids] + w["model/wpe"][:t]
    causal = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        h = _ln(x, w[p + "ln_1/g"], w[p + "ln_1/b"])
        qkv = h @ w[p + "attn/c_attn/w"][0] + w[p + "attn/c_attn/b"]
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(t, nh, hd).transpose(1, 0, 2) for a in (q, k, v))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(1, 0, 2).reshape(t, e)
        x = x + a @ w[p + "attn/c_proj/w"][0] + w[p + "attn/c_proj/b"]
        h = _ln(x, w[p + "ln_2/g"], w[p + "ln_2/b"])
        h = _gelu(h @ w[p + "mlp/c_fc/w"][0] + w[p + "mlp/c_fc/b"])
        x = x + h @ w[p + "mlp/c_proj/w"][0] + w[p + "mlp/c_proj/b"]
    x = _ln(x, w["model/ln_f/g"], w["model/ln_f/b"])
    return x @ w["model/wte"].T


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def openai_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = openai_arrays(HP)
    return write_openai_checkpoint(
        tmp_path_factory.mktemp("openai") / "124M-like", HP, arrays
    ), arrays


def test_written_layout_is_openais(openai_dir) -> None:
    folder, arrays = openai_dir
    listed = dict(tf.train.list_variables(str(folder / "model.ckpt")))
    assert listed == {k: list(v.shape) for k, v in arrays.items()}
    assert listed["model/h0/attn/c_attn/w"] == [1, 16, 48]
    assert len(listed) == 2 + 12 * HP["n_layer"] + 2
    assert 'model_checkpoint_path: "model.ckpt"' in (folder / "checkpoint").read_text()
    for f in ("model.ckpt.index", "model.ckpt.meta", "model.ckpt.data-00000-of-00001"):
        assert (folder / f).is_file()


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_logits_match_numpy_reference(openai_dir, attention: str) -> None:
    from gpt.weights.openai import load_openai_gpt2

    folder, arrays = openai_dir
    model = load_openai_gpt2(folder, attention=attention)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        61,
        24,
        16,
        4,
        2,
    )
    assert cfg.qkv_bias and cfg.tie_weights and model.is_tied and cfg.drop_rate == 0.0
    rng = np.random.default_rng(5)
    for t in (1, 7, 24):
        ids = rng.integers(0, HP["n_vocab"], t).tolist()
        ref = numpy_gpt2_logits(ids, arrays, HP)
        with torch.no_grad():
            got = model(torch.tensor([ids]))[0].double().numpy()
        assert np.abs(got - ref).max() <= 1e-4, t
        assert np.abs(ref).max() > 1.0  # non-trivial logits
    assert load_openai_gpt2(folder, drop_rate=0.1).cfg.drop_rate == 0.1


def test_convert_and_cli(openai_dir, tmp_path: Path, tokenizer_dir: Path) -> None:
    from flows.cli import main
    from gpt.checkpoint import load_checkpoint
    from gpt.weights.openai import convert_openai_checkpoint, load_openai_gpt2

    folder, _ = openai_dir
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    for n in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(tokenizer_dir / n, src / n)
    out = convert_openai_checkpoint(src, tmp_path / "ck")
    ck = load_checkpoint(out)
    ref = load_openai_gpt2(src)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k]), k
    assert ck.tokenizer_dir is not None and ck.meta["source"] == "openai-gpt2"

    rc = main(
        [
            "convert-gpt2",
            "--openai-dir",
            str(folder),
            "--out",
            str(tmp_path / "ck2"),
            "--drop-rate",
            "0.1",
            "--tokenizer-dir",
            str(tokenizer_dir),
        ]
    )
    assert rc == 0
    ck2 = load_checkpoint(tmp_path / "ck2")
    assert ck2.config.drop_rate == 0.1 and ck2.tokenizer_dir is not None
    assert torch.equal(ck2.model.tok_emb.weight, ck.model.tok_emb.weight)


def _variant(tmp_path: Path, name: str, hp: dict, mutate) -> Path:
    arrays = openai_arrays(hp)
    mutate(arrays)
    return write_openai_checkpoint(tmp_path / name, hp, arrays)


def test_unmapped_and_missing_variables(tmp_path: Path) -> None:
    from gpt.weights.openai import load_openai_gpt2

    hp = {**HP, "n_layer": 1}

    def extra_and_missing(a: dict) -> None:
        a["model/h0/attn/rogue"] = np.zeros(3, np.float32)
        del a["model/h0/mlp/c_fc/b"]

    folder = _variant(tmp_path, "bad", hp, extra_and_missing)
    with pytest.raises(CheckpointError) as info:
        load_openai_gpt2(folder)
    msg = str(info.value)
    assert "model/h0/attn/rogue" in msg and "model/h0/mlp/c_fc/b" in msg

    # hparams says 1 layer but the checkpoint has 2: the extra block is unmapped
    folder2 = _variant(tmp_path, "layers", HP, lambda a: None)
    (folder2 / "hparams.json").write_text(json.dumps(hp))
    with pytest.raises(CheckpointError, match="model/h1/ln_1/g"):
        load_openai_gpt2(folder2)


def test_wrong_shape(tmp_path: Path) -> None:
    from gpt.weights.openai import load_openai_gpt2

    hp = {**HP, "n_layer": 1}

    def bad_shape(a: dict) -> None:
        a["model/h0/attn/c_attn/w"] = np.zeros((1, 16, 32), np.float32)

    folder = _variant(tmp_path, "shape", hp, bad_shape)
    with pytest.raises(
        CheckpointError, match=r"model/h0/attn/c_attn/w: \(1, 16, 32\), expected \(1, 16, 48\)"
    ):
        load_openai_gpt2(folder)


def test_missing_files(tmp_path: Path) -> None:
    from gpt.weights.openai import load_openai_gpt2

    with pytest.raises(CheckpointError, match=r"hparams\.json"):
        load_openai_gpt2(tmp_path)
    (tmp_path / "hparams.json").write_text(json.dumps(HP))
    with pytest.raises(CheckpointError, match=r"model\.ckpt"):
        load_openai_gpt2(tmp_path)
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 5}))
    with pytest.raises(CheckpointError, match="n_ctx"):
        load_openai_gpt2(tmp_path)
