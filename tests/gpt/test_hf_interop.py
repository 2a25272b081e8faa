"""gptflow <-> Hugging Face ``transformers``: exported folders load with ``from_pretrained``
and compute gptflow's numbers; GPT-2 weights written by ``transformers`` itself import to
the numbers ``transformers`` computes. ``transformers`` is the independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _ci import DevModule

from gpt.checkpoint import save_checkpoint
from gpt.errors import CheckpointError, ExportError
from gpt.model import GPT, GPTConfig

transformers = DevModule("transformers", "a dev dependency: pip install -e '.[dev]'")

#: GPT-2-shaped (QKV bias, tied head), tiny.
TIED = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_weights=True)  # fmt: skip
#: The from-scratch recipe (context 256, no QKV bias, untied head, dropout 0.1), tiny.
UNTIED = GPTConfig(context_length=256, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1,
                   qkv_bias=False, tie_weights=False)  # fmt: skip
TEXTS = [
    "Hello, world",
    "WINNER!! Claim your free prize now, call 09061701461",
    "ok see you at lunch :)",
    "naïve café — déjà vu\n\n  spaced   out",
    "Every effort moves you forward, and then some more words to push past the limit",
]


def perturbed(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every parameter (LayerNorms and biases included) is random, so a
    wrong or swapped mapping shows in the outputs."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def prompts(cfg: GPTConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (3, min(cfg.context_length, 40)), generator=g)


# --------------------------------------------------------------------------- LM export


@pytest.mark.parametrize("cfg", [TIED, UNTIED], ids=["tied-gpt2-shaped", "untied-256"])
def test_exported_lm_matches_transformers(cfg: GPTConfig, tmp_path: Path, tokenizer_dir: Path):
    from gpt.generate import generate
    from gpt.weights.hf_export import export_hf

    model = perturbed(cfg)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tokenizer_dir)
    res = export_hf(ckpt, tmp_path / "hf")
    assert res.architecture == "GPT2LMHeadModel"
    assert res.tied is cfg.tie_weights

    hf = transformers.GPT2LMHeadModel.from_pretrained(res.path).eval()
    assert hf.config.tie_word_embeddings is cfg.tie_weights
    same_storage = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert same_storage is cfg.tie_weights  # an untied head exports as untied

    x = prompts(cfg)
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = x[0, :12].tolist()
    new = generate(model, [prompt], 24, eos_id=50256)[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=50256
        )[0, len(prompt) :].tolist()
    if out and out[-1] == 50256:
        out = out[:-1]
    assert out == new and len(new) > 0


def test_exported_tokenizer_loads_with_autotokenizer(tmp_path: Path, tokenizer_dir: Path):
    from gpt.tokenizer import Tokenizer
    from gpt.weights.hf_export import export_hf

    ckpt = save_checkpoint(tmp_path / "ckpt", perturbed(TIED), tokenizer_dir=tokenizer_dir)
    out = export_hf(ckpt, tmp_path / "hf").path
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(tokenizer_dir)
    for text in [*TEXTS, "two docs<|endoftext|>joined"]:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == 50256
    # vocab.json / merges.txt are GPT-2's own files, byte for byte
    assert (out / "vocab.json").read_bytes() == (tokenizer_dir / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (tokenizer_dir / "vocab.bpe").read_bytes()


def test_export_refuses_existing_folder_and_missing_tokenizer(tmp_path: Path, tokenizer_dir):
    from gpt.weights.hf_export import export_hf

    bare = save_checkpoint(tmp_path / "bare", perturbed(TIED))
    with pytest.raises(ExportError, match="--tokenizer-dir"):
        export_hf(bare, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(bare, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    with pytest.raises(ExportError, match="already exists"):
        export_hf(bare, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    export_hf(bare, tmp_path / "hf", tokenizer_dir=tokenizer_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")) == []


# --------------------------------------------------------------------------- classifier


def classifier_checkpoint(tmp: Path, tokenizer_dir: Path, pool: str, max_length: int) -> Path:
    from gpt.recipes.classifier import build_classifier

    model = build_classifier(perturbed(TIED, seed=3), 2, trainable_blocks=1, seed=5)
    with torch.no_grad():  # a trained-looking head: weights and a clearly non-zero bias
        model.out_head.weight.copy_(0.5 * torch.randn_like(model.out_head.weight))
        model.out_head.bias.copy_(torch.tensor([0.7, -0.4]))
    meta = {"kind": "classifier", "labels": ["ham", "spam"], "max_length": max_length,
            "pool": pool}  # fmt: skip
    return save_checkpoint(tmp / f"clf-{pool}", model, tokenizer_dir=tokenizer_dir, meta=meta)


def test_classifier_last_real_exports_with_same_probabilities(tmp_path: Path, tokenizer_dir):
    from gpt.recipes.classifier import classify
    from gpt.weights.hf_export import export_hf

    ckpt = classifier_checkpoint(tmp_path, tokenizer_dir, "last_real", max_length=12)
    res = export_hf(ckpt, tmp_path / "hf")
    assert res.architecture == "GPT2ForSequenceClassification"
    assert any("folded" in n for n in res.notes)

    hf = transformers.GPT2ForSequenceClassification.from_pretrained(res.path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(res.path)
    assert hf.config.pad_token_id == 50256 and tok.pad_token_id == 50256
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    enc = tok(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(hf(**enc).logits, dim=-1)[:, 1]
    ours = torch.tensor([p for _, p in classify(ckpt, TEXTS)])
    assert (probs - ours).abs().max().item() < 1e-5
    labels = [hf.config.id2label[int(i)] for i in hf(**enc).logits.argmax(-1)]
    assert labels == [lab for lab, _ in classify(ckpt, TEXTS)]


def test_classifier_pool_last_is_refused_or_exported_for_padded_inputs(tmp_path, tokenizer_dir):
    from gpt.recipes.classifier import classify
    from gpt.weights.hf_export import export_hf

    ckpt = classifier_checkpoint(tmp_path, tokenizer_dir, "last", max_length=14)
    with pytest.raises(ExportError, match=r"pool='last'.*last_real"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    res = export_hf(ckpt, tmp_path / "hf", allow_padded_last=True)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(res.path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(res.path)
    assert hf.config.pad_token_id is None
    ours = [p for _, p in classify(ckpt, TEXTS)]
    for text, p in zip(TEXTS, ours, strict=True):
        enc = tok(text, padding="max_length", truncation=True, max_length=14, return_tensors="pt")
        with torch.no_grad():
            prob = torch.softmax(hf(input_ids=enc["input_ids"]).logits, dim=-1)[0, 1].item()
        assert abs(prob - p) < 1e-5


def test_fold_head_bias_is_exact_and_refuses_dependent_rows():
    from gpt.weights.hf_export import fold_head_bias

    torch.manual_seed(0)
    w, b, shift = torch.randn(2, 16), torch.tensor([1.5, -2.0]), torch.randn(16)
    h = torch.randn(5, 16)
    new_shift = fold_head_bias(w, b, shift)
    assert torch.allclose((h - shift + new_shift) @ w.T, h @ w.T + b, atol=1e-5)
    with pytest.raises(ExportError, match="linearly dependent"):
        fold_head_bias(torch.ones(2, 16), b, shift)


# --------------------------------------------------------------------------- HF -> gptflow


def hf_tiny(tied: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    conf = transformers.GPT2Config(
        vocab_size=300, n_positions=48, n_embd=32, n_layer=2, n_head=4,
        tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p)) if "ln" not in name else p.mul_(1.1)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_folder_imports_to_the_same_logits(tmp_path: Path, tied: bool):
    from gpt.weights.hf import load_hf_gpt2

    hf = hf_tiny(tied)
    hf.save_pretrained(tmp_path / "hf")  # written by transformers itself
    model = load_hf_gpt2(tmp_path / "hf")
    assert model.is_tied is tied and model.cfg.qkv_bias and model.cfg.context_length == 48
    x = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_hub_layout_with_bare_names_and_mask_buffers_imports(tmp_path: Path):
    """The Hub's GPT-2 files name tensors like a bare GPT2Model and keep the old
    per-block attention-mask buffers."""
    from safetensors.torch import save_file

    from gpt.weights.hf import load_hf_gpt2

    hf = hf_tiny()
    folder = tmp_path / "hub"
    hf.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in
             hf.transformer.state_dict().items()}  # fmt: skip
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(48, 48)).view(1, 1, 48, 48)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = load_hf_gpt2(folder)
    x = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


def test_import_refuses_unknown_or_misshapen_tensors(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from gpt.weights.hf import load_hf_gpt2

    folder = tmp_path / "hf"
    hf_tiny().save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "transformer.h.0.extra": torch.zeros(3)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"unknown tensors.*h\.0\.extra"):
        load_hf_gpt2(folder)
    bad = dict(state)
    bad["transformer.h.1.mlp.c_fc.weight"] = bad["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(bad, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight: \(128, 32\)"):
        load_hf_gpt2(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        load_hf_gpt2(folder)


def test_export_then_import_round_trips(tmp_path: Path, tokenizer_dir: Path):
    from gpt.checkpoint import load_checkpoint
    from gpt.weights.hf import convert_hf_checkpoint
    from gpt.weights.hf_export import export_hf

    model = perturbed(UNTIED)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tokenizer_dir)
    out = export_hf(ckpt, tmp_path / "hf").path
    back = convert_hf_checkpoint(out, tmp_path / "back")  # tokenizer from vocab.json/merges.txt
    loaded = load_checkpoint(back)
    assert loaded.tokenizer_dir is not None and not loaded.model.is_tied
    x = prompts(UNTIED)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-5)


def test_cli_export(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture):
    from flows.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt", perturbed(TIED), tokenizer_dir=tokenizer_dir)
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert "already exists" in capsys.readouterr().err
