"""gptflow's LoRA against ``peft`` (the independent reference): a LoRA checkpoint
exported with ``--format peft`` and loaded by ``peft.PeftModel.from_pretrained`` on the
base exported with ``--format hf`` computes gptflow's logits within 1e-5, for the
language model and the classifier; ``--format hf`` of a LoRA checkpoint is the merged
model. Under CI a missing ``peft`` / ``transformers`` fails instead of skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _ci import DevModule

from gpt.adapter import adapt
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.lora import LoraArgs, lora_modules
from gpt.model import GPT, GPTConfig

transformers = DevModule("transformers", "a dev dependency: pip install -e '.[dev]'")
peft = DevModule("peft", "a dev dependency: pip install -e '.[dev]'")

#: GPT-2-shaped (QKV bias, tied head), tiny.
CFG = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                qkv_bias=True, tie_weights=True)  # fmt: skip
TOL = 1e-5


def _perturbed(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.2 * torch.randn_like(p))  # fmt: skip
    return model.eval()


def _train_adapters(model: torch.nn.Module, seed: int) -> None:
    """Random adapters (B starts at zero, so an untouched adapter would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.copy_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (3, 20), generator=g)


@pytest.fixture
def base(tmp_path: Path, tokenizer_dir: Path) -> Path:
    return save_checkpoint(tmp_path / "base", _perturbed(0), tokenizer_dir=tokenizer_dir)


LAYER_SETS = [("all",), ("query", "value"), ("key", "fc2", "out_head")]


@pytest.mark.parametrize("layers", LAYER_SETS, ids=["all", "query+value", "key+fc2+head"])
def test_language_model_logits_equal_peft(base: Path, tmp_path: Path, layers) -> None:
    from gpt.weights.peft_export import export_peft

    model = load_checkpoint(base).model
    adapt(model, LoraArgs(rank=4, alpha=8, layers=layers), base_dir=base, seed=3)
    _train_adapters(model, seed=4)
    ckpt = save_checkpoint(tmp_path / "lora", model)
    res = export_peft(ckpt, tmp_path / "peft", base_out=tmp_path / "base-hf")
    assert res.task_type == "CAUSAL_LM"

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base-hf")
    theirs_model = peft.PeftModel.from_pretrained(hf, res.path).eval()
    x = _ids()
    with torch.no_grad():
        ours = model.eval()(x)
        merged = load_checkpoint(ckpt).model(x)  # merged on load
        theirs = theirs_model(x).logits
        base_logits = load_checkpoint(base).model(x)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter does change the model
    assert (ours - theirs).abs().max().item() < TOL
    # merging adds B·A into W once: float32 rounding relative to the logits' size
    assert (merged - theirs).abs().max().item() < TOL * theirs.abs().max().item()


def test_classifier_logits_equal_peft(base: Path, tmp_path: Path, tokenizer_dir: Path) -> None:
    from gpt.recipes.classifier import SpamArgs, encode_spam, prepare_classifier
    from gpt.recipes.classifier_model import pool
    from gpt.tokenizer import Tokenizer
    from gpt.weights.peft_export import export_peft

    args = SpamArgs(lora=LoraArgs(rank=4, alpha=8), pool="last_real")
    model = prepare_classifier(load_checkpoint(base).model, args, base_dir=base)
    _train_adapters(model, seed=5)
    with torch.no_grad():  # the new head is frozen but random: give its bias a value
        model.out_head.bias.copy_(torch.tensor([0.7, -0.4]))
    meta = {"kind": "classifier", "labels": ["ham", "spam"], "max_length": 24,
            "pool": "last_real"}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "lora-clf", model, meta=meta, tokenizer_dir=tokenizer_dir)
    res = export_peft(ckpt, tmp_path / "peft", base_out=tmp_path / "base-hf")
    assert res.task_type == "SEQ_CLS"

    hf = transformers.GPT2ForSequenceClassification.from_pretrained(
        tmp_path / "base-hf", num_labels=2, pad_token_id=50256
    )
    theirs_model = peft.PeftModel.from_pretrained(hf, res.path).eval()
    texts = ["WINNER!! Claim your free prize now", "ok see you at lunch :)", "Hi"]
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = encode_spam(texts, tok, 24)
    last = torch.tensor([min(len(tok.encode(t)), 24) - 1 for t in texts])
    with torch.no_grad():
        ours = pool(model.eval()(ids), last)
        merged = pool(load_checkpoint(ckpt).model(ids), last)
        theirs = theirs_model(input_ids=ids, attention_mask=(ids != 50256).long()).logits
    assert (ours - theirs).abs().max().item() < TOL
    assert (merged - theirs).abs().max().item() < TOL * theirs.abs().max().item()


def test_hf_export_of_a_lora_checkpoint_is_the_merged_model(base: Path, tmp_path: Path) -> None:
    from gpt.weights.hf_export import export_hf

    model = load_checkpoint(base).model
    adapt(model, LoraArgs(rank=4, alpha=8), base_dir=base, seed=3)
    _train_adapters(model, seed=6)
    ckpt = save_checkpoint(tmp_path / "lora", model)
    res = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(res.path).eval()
    x = _ids(2)
    with torch.no_grad():
        ours, theirs = model.eval()(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < TOL * theirs.abs().max().item()


def test_peft_export_refuses_a_full_checkpoint(base: Path, tmp_path: Path) -> None:
    from gpt.errors import ExportError
    from gpt.weights.peft_export import export_peft

    with pytest.raises(ExportError, match="not a LoRA adapter"):
        export_peft(base, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_cli_export_peft(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    model = load_checkpoint(base).model
    adapt(model, LoraArgs(rank=2), base_dir=base, seed=1)
    ckpt = save_checkpoint(tmp_path / "lora", model)
    out, base_hf = tmp_path / "peft", tmp_path / "base-hf"
    args = ["export", str(ckpt), "--format", "peft", "--out", str(out), "--base-out", str(base_hf)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (peft LoRA adapter, CAUSAL_LM)" in printed
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_hf) and cfg["r"] == 2
    assert (base_hf / "model.safetensors").exists()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x"), "--base-out", "y"]) == 1
    assert "--base-out goes with --format peft" in capsys.readouterr().err
