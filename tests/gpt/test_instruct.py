"""Instruction finetuning: the reference collate, prompt masking, training, extraction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gpt.architecture import get_config
from gpt.args import ExtractArgs, InstructArgs
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.model import GPT
from gpt.recipes.extract import export_responses_json, extract_responses
from gpt.recipes.instruct import (
    InstructionDataset,
    batch_indices,
    collate_instruct,
    finetune_instruct,
    make_instruct_loader,
)
from gpt.tokenizer import Tokenizer

EOT = 50256
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def alpaca(rec: dict) -> str:
    """The reference template (FACTS §3), written out independently of gpt.prompts."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{rec['instruction']}"
    if rec["input"]:
        text += f"\n\n### Input:\n{rec['input']}"
    return text


def reference_collate(batch, max_length=None, prompt_lengths=None):
    """The reference rule as a plain loop."""
    width = max(len(b) for b in batch) + 1
    xs, ys = [], []
    for i, item in enumerate(batch):
        seq = list(item) + [EOT] * (width - len(item))
        x, y = seq[:-1], seq[1:]
        first = True
        for j, t in enumerate(y):
            if t == EOT:
                if first:
                    first = False
                else:
                    y[j] = -100
        if prompt_lengths is not None:
            for j in range(prompt_lengths[i] - 1):
                y[j] = -100
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.fixture(scope="module")
def records(mirror: Path) -> list[dict]:
    return json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(mirror: Path) -> Tokenizer:
    return Tokenizer.from_dir(mirror / "gpt2")


def test_collate_book_example() -> None:
    x, y = collate_instruct([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert y.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100], [8, 9, EOT, -100, -100]]


def test_collate_matches_reference_rule_randomised() -> None:
    rng = random.Random(0)
    for _ in range(200):
        batch = [
            [rng.choice([EOT, *range(10)]) for _ in range(rng.randint(1, 12))]
            for _ in range(rng.randint(1, 5))
        ]
        max_len = rng.choice([None, 3, 8, 20])
        prompts = [rng.randint(0, len(b) + 1) for b in batch] if rng.random() < 0.5 else None
        x, y = collate_instruct(batch, max_length=max_len, mask_prompt_lengths=prompts)
        rx, ry = reference_collate(batch, max_len, prompts)
        assert x.tolist() == rx and y.tolist() == ry, (batch, max_len, prompts)


def test_dataset_prompt_lengths_and_masking(records: list[dict], tok: Tokenizer) -> None:
    recs = records[:6]
    ds = InstructionDataset(recs, tok)
    assert len(ds) == 6
    for i, rec in enumerate(recs):
        full = alpaca(rec) + "\n\n### Response:\n" + rec["output"]
        assert ds[i] == tok.encode(full)
        n = ds.prompt_lengths[i]
        assert tok.decode(ds[i][:n]) == alpaca(rec) + "\n\n### Response:\n"
    idx = [0, 1, 2]
    _, y = collate_instruct(
        [ds[i] for i in idx], mask_prompt_lengths=[ds.prompt_lengths[i] for i in idx]
    )
    _, y_plain = collate_instruct([ds[i] for i in idx])
    for row, i in enumerate(idx):
        n = ds.prompt_lengths[i]
        assert (y[row, : n - 1] == -100).all()
        # the first unmasked target is the first response token, predicted from the header
        assert y[row, n - 1].item() == ds[i][n] == y_plain[row, n - 1].item()
        kept = y[row][y[row] != -100].tolist()
        assert kept == [*ds[i][n:], EOT]
        assert tok.decode(kept[:-1]) == recs[i]["output"]


def test_training_loss_ignores_minus_100() -> None:
    """The loss train_lm uses averages over the non -100 targets only."""
    from gpt.lm_step import lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, 2, -100, 3, -100], [-100, -100, 4, 5, 6]])
    keep = targets != -100
    manual = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    got = lm_loss(lambda _x: logits, torch.zeros(2, 5, dtype=torch.long), targets)
    assert got.item() == pytest.approx(manual.item(), rel=1e-6)


def test_loader_batches(records: list[dict], tok: Tokenizer) -> None:
    ds = InstructionDataset(records[:21], tok)
    for bucketing in (False, True):
        loader = make_instruct_loader(
            ds, 4, shuffle=True, drop_last=True, seed=5, max_length=40, mask_prompt=True,
            bucketing=bucketing,
        )  # fmt: skip
        batches = list(loader)
        assert len(loader) == len(batches) == 5
        again = list(make_instruct_loader(
            ds, 4, shuffle=True, drop_last=True, seed=5, max_length=40, mask_prompt=True,
            bucketing=bucketing,
        ))  # fmt: skip
        assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
        for x, y in batches:
            assert x.shape == y.shape and x.shape[0] == 4 and x.shape[1] <= 40
    # in file order, the first batch is exactly the reference collate of records 0..3
    x, y = next(iter(make_instruct_loader(ds, 4, shuffle=False, drop_last=False)))
    rx, ry = reference_collate([ds[i] for i in range(4)])
    assert x.tolist() == rx and y.tolist() == ry


def test_batch_indices_bucketing() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    for bucketing in (False, True):
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        b1 = batch_indices(lengths, 8, shuffle=True, generator=g1, bucketing=bucketing)
        b2 = batch_indices(lengths, 8, shuffle=True, generator=g2, bucketing=bucketing)
        assert b1 == b2  # seeded
        assert sorted(i for b in b1 for i in b) == list(range(203))
        dropped = batch_indices(lengths, 8, shuffle=True, generator=g1, drop_last=True)
        assert len(dropped) == 203 // 8 and all(len(b) == 8 for b in dropped)

    def waste(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    plain = batch_indices(lengths, 8, shuffle=True, generator=torch.Generator().manual_seed(3))
    bucket = batch_indices(
        lengths, 8, shuffle=True, generator=torch.Generator().manual_seed(3), bucketing=True
    )
    assert waste(bucket) < 0.5 * waste(plain)


def _tiny_lm(path: Path, tokenizer_dir: Path, ctx: int = 96) -> Path:
    torch.manual_seed(11)
    cfg = get_config("tiny", context_length=ctx, drop_rate=0.0)
    return save_checkpoint(path, GPT(cfg), tokenizer_dir=tokenizer_dir)


def test_finetune_instruct_tiny(tmp_path: Path, tokenizer_dir: Path, records: list[dict]) -> None:
    base = _tiny_lm(tmp_path / "base", tokenizer_dir, ctx=64)
    rows, samples = [], []
    args = InstructArgs(
        epochs=2, batch_size=4, lr=2e-3, eval_every=2, eval_batches=1, sample_tokens=4
    )
    res = finetune_instruct(
        base,
        records[:10],
        records[10:12],
        args,
        out_dir=tmp_path / "inst",
        on_metrics=rows.extend,
        on_sample=samples.append,
        progress=False,
    )
    # 10 records, batch 4, drop_last: 2 steps per epoch; max_length capped at the context
    assert res["steps"] == 4 and res["max_length"] == 64
    for r in rows:
        assert set(r) == {"step", "epoch", "seen", "split", "name", "value"}
    losses = [r for r in rows if r["name"] == "loss"]
    # train_lm evaluates after steps 1, 1 + eval_every, ... and the last step
    assert sorted((r["step"], r["split"]) for r in losses) == [
        (s, sp) for s in (1, 3, 4) for sp in ("train", "val")
    ]
    train = [r["value"] for r in losses if r["split"] == "train"]
    assert train[-1] < train[0]  # it learns
    seen = {r["step"]: r["seen"] for r in rows}
    # tokens seen = sum of batch widths x 4; a width is the batch's longest text (<= 64)
    assert seen[4] % 4 == 0 and 4 * 4 * 51 <= seen[4] <= 4 * 4 * 64
    assert seen[1] < seen[3] < seen[4]
    assert [s["epoch"] for s in samples] == [1, 2]
    prompt = alpaca(records[10])
    assert all(s["prompt"] == prompt and PREAMBLE not in s["text"] for s in samples)
    loaded = load_checkpoint(tmp_path / "inst")
    assert loaded.kind == "lm" and loaded.hparams["epochs"] == 2
    assert not (tmp_path / "inst" / "train").exists()  # the resumable state is replaced
    assert res["final_train_loss"] == pytest.approx(train[-1])


def _scripted_lm(path: Path, tokenizer_dir: Path, class_of: torch.Tensor, next_of: dict) -> Path:
    """A real 1-block GPT whose greedy next token depends only on the last token.

    Attention and MLP outputs are zeroed and positions are zero, so the final hidden state
    of a position is LayerNorm(tok_emb[token]). Token ``x`` gets the embedding u[class_of[x]]
    (rows of a 64x64 Hadamard matrix: zero mean, unit variance, orthogonal), and the head
    row of token ``y`` is 10 * the sum of u[c] over the classes c with ``next_of[c] == y``.
    """
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    u = h[1:]  # 63 zero-mean orthogonal +-1 rows
    cfg = get_config(
        "tiny", emb_dim=64, n_heads=2, n_layers=1, context_length=256, drop_rate=0.0,
        tie_weights=False,
    )  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.att.out_proj, block.ff.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        model.pos_emb.weight.zero_()
        model.tok_emb.weight.copy_(u[class_of])
        model.out_head.weight.zero_()
        for c, y in next_of.items():
            model.out_head.weight[y] += 10.0 * u[c]
    return save_checkpoint(path, model, tokenizer_dir=tokenizer_dir)


def test_extract_stops_at_eos_without_prompt(
    tmp_path: Path, tokenizer_dir: Path, records: list[dict], tok: Tokenizer
) -> None:
    # a prompt ending in token t continues with a chain of r+1 tokens (r = t % 3), then EOS:
    # r=0: 40000; r=1: 40010 40011; r=2: 40020 40021 40022
    base = 40000
    class_of = torch.arange(50257) % 3  # classes 0-2: "after a prompt token with r = t % 3"
    next_of = {0: base, 1: base + 10, 2: base + 20}
    cls = 3
    for r in range(3):
        for j in range(r + 1):
            class_of[base + 10 * r + j] = cls
            next_of[cls] = base + 10 * r + j + 1 if j < r else EOT
            cls += 1
    ckpt = _scripted_lm(tmp_path / "lm", tokenizer_dir, class_of, next_of)
    recs = [dict(r, example_id=f"ex{i}") for i, r in enumerate(records[:7])]
    rows = extract_responses(
        ckpt, recs, ExtractArgs(max_new_tokens=20, batch_size=3), progress=False
    ).rows
    assert [r["example_id"] for r in rows] == [f"ex{i}" for i in range(7)]
    assert len({tok.encode(alpaca(rec))[-1] % 3 for rec in recs}) > 1  # chains differ
    for rec, row in zip(recs, rows, strict=True):
        r = tok.encode(alpaca(rec))[-1] % 3
        expected = [base + 10 * r + j for j in range(r + 1)]
        assert row["new_tokens"] == r + 1 < 20
        assert row["response"] == tok.decode(expected).strip()
        assert PREAMBLE not in row["response"] and rec["instruction"] not in row["response"]
        assert row["output"] == rec["output"] and row["seconds"] > 0

    path = export_responses_json(rows, tmp_path / "out" / "responses.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [set(d) for d in data] == [{"instruction", "input", "output", "model_response"}] * 7
    assert [d["model_response"] for d in data] == [r["response"] for r in rows]
    assert sorted(p.name for p in path.parent.iterdir()) == ["responses.json"]


def test_extract_strips_response_header(
    tmp_path: Path, tokenizer_dir: Path, records: list[dict], tok: Tokenizer
) -> None:
    script = tok.encode("### Response:\nThe answer is 42.")
    assert len(set(script)) == len(script) < 60
    class_of = torch.zeros(50257, dtype=torch.long)  # class 0: any prompt token
    next_of = {0: script[0]}
    for i, t in enumerate(script, start=1):
        class_of[t] = i
        next_of[i] = script[i] if i < len(script) else EOT
    rec = next(r for r in records if tok.encode(alpaca(r))[-1] not in script)
    ckpt = _scripted_lm(tmp_path / "lm", tokenizer_dir, class_of, next_of)
    rows = extract_responses(ckpt, [rec], ExtractArgs(max_new_tokens=50), progress=False).rows
    assert rows[0]["response"] == "The answer is 42."
    assert rows[0]["new_tokens"] == len(script)
    assert rows[0]["example_id"] == 0
