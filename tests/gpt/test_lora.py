"""LoRA: the layer's arithmetic, the settings, adapter-only checkpoints tied to their base,
and both finetunes trained with adapters (read back merged by every checkpoint reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt.adapter import adapt
from gpt.architecture import GPTConfig, get_config
from gpt.args import InstructArgs, LoraArgs, SpamArgs
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.errors import CheckpointError, ConfigError
from gpt.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    linear_rows,
    lora_modules,
    lora_targets,
    merge_lora,
)
from gpt.model import GPT
from gpt.recipes.classifier import finetune_classifier, prepare_classifier

TINY = GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_weights=True)  # fmt: skip


def _random_adapters(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


# --------------------------------------------------------------------------- the book's count


def test_book_spam_setting_trains_exactly_2666528_parameters() -> None:
    """Appendix E: GPT-2 124M, Linear(768, 2) head, everything frozen, rank 16 / alpha 16
    on every linear layer (the class head too) -> 2,666,528 trainable parameters."""
    args = SpamArgs(lora=True)
    assert (args.lora.rank, args.lora.alpha) == (16, 16.0)
    assert args.trainable_blocks == 0 and args.train_final_norm is False
    with torch.device("meta"):
        model = GPT(get_config("124M"))
    prepare_classifier(model, args, base_dir=None)
    assert count_trainable(model) == 2_666_528
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable)  # all base weights (and the head) frozen
    # one adapter per projection: q, k and v each rank 16 (as the book's three layers)
    qkv = model.blocks[0].att.qkv
    assert qkv.lora_A.shape == (3 * 16, 768) and qkv.lora_B.shape == (3 * 768, 16)


# --------------------------------------------------------------------------- the layer


def test_lora_linear_computes_w_x_plus_scaled_b_a_x() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    ref = base(x).detach()
    layer = LoRALinear(base, rank=2, alpha=3.0)
    assert layer.weight is base.weight  # the base tensor itself, not a copy
    assert torch.equal(layer(x), ref)  # B starts at zero: nothing changes at step 0
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    want = x @ base.weight.T + base.bias + (3.0 / 2) * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), want, atol=1e-6)
    assert torch.allclose(layer.rows(x, 1, 4), want[:, 1:4], atol=1e-6)
    assert torch.allclose(linear_rows(base, x, 1, 4), ref[:, 1:4])
    assert torch.allclose(x @ layer.merged_weight().T + base.bias, want, atol=1e-6)


def test_fused_qkv_parts_are_adapted_separately() -> None:
    """query and value adapted, key not: the key rows are the base's, and each adapted
    part is its own rank-r update."""
    torch.manual_seed(1)
    model = GPT(TINY).eval()
    d = TINY.emb_dim
    targets = lora_targets(model, ("query", "value"))
    assert targets == {f"blocks.{i}.att.qkv": ("query", "value") for i in range(2)}
    qkv_base = model.blocks[0].att.qkv
    x = torch.randn(2, 3, d)
    before = qkv_base(x).detach()
    apply_lora(model, targets, rank=2, alpha=4.0, seed=0)
    _random_adapters(model)
    layer = model.blocks[0].att.qkv
    out = layer(x)
    assert torch.equal(out[..., d : 2 * d], before[..., d : 2 * d])  # key untouched
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    for i, (lo, hi) in enumerate([(0, d), (2 * d, 3 * d)]):
        delta = 2.0 * (x @ a[2 * i : 2 * i + 2].T @ b[i * d : (i + 1) * d].T)
        assert torch.allclose(out[..., lo:hi], before[..., lo:hi] + delta, atol=1e-5)
    assert torch.allclose(layer.rows(x, d, 3 * d), out[..., d:], atol=1e-6)


def test_merge_keeps_outputs_and_unties_an_adapted_head() -> None:
    torch.manual_seed(2)
    model = GPT(TINY).eval()
    emb = model.tok_emb.weight.detach().clone()
    apply_lora(model, lora_targets(model, LoraArgs().layers), rank=4, alpha=8.0, seed=0)
    _random_adapters(model)
    x = torch.randint(0, TINY.vocab_size, (2, 10))
    want = model(x)
    merge_lora(model)
    assert not lora_modules(model) and not model.is_tied
    assert torch.equal(model.tok_emb.weight, emb)  # the embedding is not changed
    assert torch.allclose(model(x), want, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_block_at_with_adapters_equals_the_full_block(attention: str) -> None:
    from gpt.recipes.classifier_model import block_at

    torch.manual_seed(0)
    model = GPT(get_config("tiny", attention=attention, drop_rate=0.0))
    apply_lora(model, lora_targets(model, LoraArgs().layers), rank=2, alpha=4.0, seed=0)
    _random_adapters(model)
    block = model.blocks[-1]
    x = torch.randn(4, 9, model.cfg.emb_dim)
    where = torch.tensor([8, 2, 0, 5])
    full = block(x)[torch.arange(4), where]
    fast = block_at(block, x, where)
    assert torch.allclose(fast, full, atol=1e-5)
    params = [p for p in block.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(full.square().sum(), params)
    g_fast = torch.autograd.grad(fast.square().sum(), params)
    for a, b in zip(g_fast, g_full, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


# --------------------------------------------------------------------------- settings


def test_settings_validate_at_config_time() -> None:
    from flows.config import build_config

    cfg = build_config(
        "smoke",
        ["finetune_spam.lora=true", 'finetune_instruct.lora={"rank": 4, "layers": "all"}'],
    )
    assert cfg.finetune_spam.lora == LoraArgs()
    assert cfg.finetune_instruct.lora.rank == 4
    assert cfg.finetune_instruct.lora.layers == LoraArgs().layers
    assert build_config("smoke", ["finetune_spam.lora=false"]).finetune_spam.lora is None
    assert build_config("smoke").finetune_instruct.lora is None  # off by default
    # layers in any order or repeated are one setting (one cache key)
    assert LoraArgs(layers=["fc1", "query", "fc1"]).layers == ("query", "fc1")
    with pytest.raises(ConfigError) as bad:
        build_config("smoke", ['finetune_spam.lora.layers=["query", "W_query"]'])
    msg = str(bad.value)
    assert "finetune_spam.lora.layers" in msg and "W_query" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"finetune_instruct\.lora\.rank"):
        build_config("smoke", ["finetune_instruct.lora.rank=0"])
    with pytest.raises(ConfigError, match=r"finetune_spam\.lora\.dropout"):
        build_config("smoke", ["finetune_spam.lora.dropout=1.5"])
    # with LoRA, trainable_blocks / train_final_norm still apply when set explicitly
    hybrid = SpamArgs(lora=True, trainable_blocks=1)
    assert hybrid.trainable_blocks == 1 and hybrid.train_final_norm is False


def test_lora_settings_are_part_of_the_stage_key() -> None:
    from tasks.stages.runner import key_parts, load_spec

    spam, inst = load_spec("finetune_spam"), load_spec("finetune_instruct")
    inputs = {"tokenize": None, "load_gpt2": None}
    keys = {
        key_parts(spam, SpamArgs(), inputs).key,
        key_parts(spam, SpamArgs(lora=True), inputs).key,
        key_parts(spam, SpamArgs(lora={"rank": 8}), inputs).key,
        key_parts(spam, SpamArgs(lora={"layers": ["query", "value"]}), inputs).key,
        key_parts(inst, InstructArgs(), inputs).key,
        key_parts(inst, InstructArgs(lora={"alpha": 32}), inputs).key,
    }
    assert len(keys) == 6


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def base(tmp_path: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(3)
    return save_checkpoint(tmp_path / "base", GPT(TINY), tokenizer_dir=tokenizer_dir)


def test_lora_checkpoint_holds_the_adapter_and_its_base(base: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = load_checkpoint(base).model
    adapt(model, LoraArgs(rank=2, alpha=4), base_dir=base, seed=1)
    _random_adapters(model)
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    want = model.eval()(x)
    ckpt = save_checkpoint(tmp_path / "lora", model)
    assert not (ckpt / "model.safetensors").exists()
    with safe_open(str(ckpt / "adapter.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names and all(".lora_" in n for n in names)  # no base weight is stored
    assert (ckpt / "adapter.safetensors").stat().st_size < (
        base / "model.safetensors"
    ).stat().st_size / 10
    info = json.loads((ckpt / "config.json").read_text())["adapter"]
    assert "path" not in info["base"]  # where the base was is a record, not the result
    assert load_checkpoint(ckpt, merge=False).record["adapter_base_path"] == str(base.resolve())
    assert (
        info["base"]["sha256"]
        == __import__("hashlib").sha256((base / "manifest.json").read_bytes()).hexdigest()
    )
    merged = load_checkpoint(ckpt)
    assert not lora_modules(merged.model) and merged.tokenizer_dir is not None
    assert torch.allclose(merged.model(x), want, atol=1e-5)
    apart = load_checkpoint(ckpt, merge=False).model
    assert torch.equal(apart(x), want)
    assert count_trainable(apart) == sum(t.numel() for t in lora_modules(apart).values()
                                         for t in (t.lora_A, t.lora_B))  # fmt: skip

    # the artifacts folder moved: the base is found relative to the adapter
    moved = tmp_path / "moved"
    moved.mkdir()
    base.rename(moved / "base")
    ckpt.rename(moved / "lora")
    assert torch.allclose(load_checkpoint(moved / "lora").model(x), want, atol=1e-5)


def test_lora_checkpoint_refuses_another_base(base: Path, tmp_path: Path) -> None:
    model = load_checkpoint(base).model
    adapt(model, LoraArgs(rank=2), base_dir=base, seed=1)
    ckpt = save_checkpoint(tmp_path / "lora", model)
    torch.manual_seed(99)
    other = save_checkpoint(tmp_path / "other", GPT(TINY))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt, base=other)
    msg = str(exc.value)
    assert "another checkpoint" in msg and str(other) in msg and "\n" not in msg
    # the base replaced in place (same path, other weights) is refused the same way
    save_checkpoint(base, GPT(TINY))
    with pytest.raises(CheckpointError, match="another checkpoint"):
        load_checkpoint(ckpt)
    import shutil

    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="is not there"):
        load_checkpoint(ckpt)


def test_a_lora_model_without_a_base_is_not_saved_as_a_full_model(tmp_path: Path) -> None:
    model = GPT(TINY)
    apply_lora(model, lora_targets(model, ("fc1",)), rank=2, alpha=2.0)
    with pytest.raises(CheckpointError, match="merge it"):
        save_checkpoint(tmp_path / "x", model)
    assert not (tmp_path / "x").exists()
    save_checkpoint(tmp_path / "x", merge_lora(model))  # merged: a full checkpoint
    assert (tmp_path / "x" / "model.safetensors").exists()


# --------------------------------------------------------------------------- finetunes


@pytest.fixture(scope="module")
def sms_slice(mirror: Path) -> dict[str, tuple[list[str], list[int]]]:
    from gpt.data.parsing import balance_and_split_spam, parse_sms

    parts = balance_and_split_spam(parse_sms(mirror / "sms+spam+collection.zip"), seed=123)
    sizes = {"train": 32, "val": 8, "test": 8}
    return {
        k: ([r.text for r in parts[k][:n]], [int(r.label == "spam") for r in parts[k][:n]])
        for k, n in sizes.items()
    }


def test_spam_finetune_with_lora(tmp_path: Path, tokenizer_dir: Path, sms_slice) -> None:
    from gpt.recipes.classifier_model import classify

    torch.manual_seed(7)
    cfg = get_config("tiny", n_layers=3, drop_rate=0.0, context_length=64)
    base = save_checkpoint(tmp_path / "base", GPT(cfg), tokenizer_dir=tokenizer_dir)
    results, rows = {}, []
    for cached in (True, False):
        args = SpamArgs(lora={"rank": 4, "alpha": 8}, epochs=2, lr=1e-2, max_length=40,
                        prefix_cache=cached)  # fmt: skip
        results[cached] = finetune_classifier(
            base, sms_slice, args, out_dir=tmp_path / f"clf{cached}", progress=False,
            on_metrics=rows.extend if cached else None,
        )  # fmt: skip
    res = results[True]
    # the frozen prefix is the embeddings alone: the cached path trains like the full one
    a, b = res["step_losses"], results[False]["step_losses"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5 and len(set(a)) > 1
    assert res["n_frozen_blocks"] == 0
    n_adapter = res["trainable_params"]
    d = cfg.emb_dim
    per_block = 3 * 4 * (d + d) + 4 * (d + d) + 4 * (d + 4 * d) + 4 * (4 * d + d)
    assert n_adapter == 3 * per_block + 4 * (d + 2)
    size = res["model_size"]
    assert size["lora"]["rank"] == 4 and size["base"]["name"] == base.resolve().name
    numbers = {r["name"]: r["value"] for r in rows if r["name"] in size}
    assert numbers == {"trainable_params": n_adapter, "checkpoint_bytes": size["checkpoint_bytes"]}
    ckpt = tmp_path / "clfTrue"
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    # read back merged by the classifier's own reader: the stored test predictions
    texts = sms_slice["test"][0]
    got = classify(ckpt, texts)
    preds = [p for p in res["predictions"] if p["split"] == "test"]
    assert [lab for lab, _ in got] == [p["prediction"] for p in preds]
    assert [q for _, q in got] == pytest.approx([p["prob_spam"] for p in preds], abs=1e-5)


def test_instruct_finetune_with_lora_generate_and_extract(
    tmp_path: Path, tokenizer_dir: Path, mirror: Path, capsys: pytest.CaptureFixture
) -> None:
    from flows.cli import main
    from gpt.args import ExtractArgs
    from gpt.recipes.extract import extract_responses
    from gpt.recipes.instruct import finetune_instruct

    records = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))[:12]
    torch.manual_seed(5)
    base = save_checkpoint(
        tmp_path / "base", GPT(get_config("tiny", drop_rate=0.0)), tokenizer_dir=tokenizer_dir
    )
    rows: list[dict] = []
    args = InstructArgs(lora={"rank": 4, "alpha": 8, "dropout": 0.1}, epochs=2, batch_size=4,
                        lr=1e-2, eval_every=1, eval_batches=1, sample_tokens=3)  # fmt: skip
    res = finetune_instruct(base, records[:8], records[8:10], args, out_dir=tmp_path / "inst",
                            on_metrics=rows.extend, progress=False)  # fmt: skip
    train = [r["value"] for r in rows if r["name"] == "loss" and r["split"] == "train"]
    assert train[-1] < train[0]
    ck = tmp_path / "inst"
    assert (ck / "adapter.safetensors").exists() and not (ck / "train").exists()
    d, vocab = 32, 50257  # rank 4 on every linear layer of 2 blocks and the vocabulary head
    per_block = 3 * 4 * (d + d) + 4 * (d + d) + 4 * (d + 4 * d) + 4 * (4 * d + d)
    assert res["trainable_params"] == res["model_size"]["trainable_params"]
    assert res["trainable_params"] == 2 * per_block + 4 * (d + vocab)
    assert res["model_size"]["checkpoint_bytes"] < (base / "model.safetensors").stat().st_size
    # every reader gets the merged model: extraction and `gptflow generate`
    out = extract_responses(ck, records[10:12], ExtractArgs(max_new_tokens=4), progress=False).rows
    assert len(out) == 2 and all(r["new_tokens"] <= 4 for r in out)
    merged = load_checkpoint(ck).model
    from gpt.generate import generate
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    want = tok.decode(generate(merged, [tok.encode("Every effort")], 5, eos_id=tok.eot_id)[0])
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "Every effort",
                 "--max-new-tokens", "5"]) == 0  # fmt: skip
    assert capsys.readouterr().out == want + "\n"
