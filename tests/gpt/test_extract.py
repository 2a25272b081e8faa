"""Response extraction with exact multi-token decoding and opt-in int8 weights: the same
responses with and without drafts; int8's cost (identical-token share, the judge's mean
score change) measured and stated; settings and stage key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.ollama_stub import OllamaStub
from gpt.architecture import GPTConfig
from gpt.args import ExtractArgs
from gpt.checkpoint import save_checkpoint
from gpt.decode import greedy_decode
from gpt.eval.int8_cost import sample_indices, token_agreement
from gpt.eval.judge.settings import JudgeConfig
from gpt.model import GPT
from gpt.prompts import format_alpaca
from gpt.quantize import quantize_int8
from gpt.recipes.extract import clean_response, extract_responses
from gpt.tokenizer import Tokenizer

# GPT-2 vocabulary, tiny. Tied random weights: greedy text that repeats itself (drafts
# get accepted); untied: varied text whose small margins int8 weights sometimes flip.
CFG = GPTConfig(context_length=192, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
VARIED = CFG.replace(emb_dim=64, tie_weights=False)


@pytest.fixture(scope="module")
def records(mirror: Path) -> list[dict]:
    recs = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))
    return [dict(r, example_id=i) for i, r in enumerate(recs[:20])]


def _save(tmp: pytest.TempPathFactory, tokenizer_dir: Path, cfg: GPTConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    path = tmp.mktemp("ckpt") / "lm"
    return save_checkpoint(path, GPT(cfg).eval(), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _save(tmp_path_factory, tokenizer_dir, CFG, 7)


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _save(tmp_path_factory, tokenizer_dir, VARIED, 8)


def test_drafts_change_speed_not_responses(ckpt: Path, records: list[dict]) -> None:
    args = ExtractArgs(max_new_tokens=30, batch_size=4)
    fast = extract_responses(ckpt, records, args, progress=False)
    plain = extract_responses(ckpt, records, args.replace(draft="none"), progress=False)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in fast.rows]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in plain.rows]
    assert fast.decoding["accepted"] > 0 and fast.decoding["passes"] < plain.decoding["passes"]
    assert plain.decoding["drafted"] == 0 and fast.int8_cost is None
    assert all(r["seconds"] > 0 for r in fast.rows)


def _int8_setup(
    ckpt: Path, records: list[dict], tokenizer_dir: Path
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """fp32 and int8 greedy tokens of the records, computed here independently, and the
    sample the stage checks."""
    from gpt.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt).model.eval()
    tok = Tokenizer.from_dir(tokenizer_dir)
    prompts = [tok.encode(format_alpaca(r["instruction"], r["input"])) for r in records]
    fp32 = greedy_decode(model, prompts, 30, eos_id=50256, draft=None).tokens
    int8 = greedy_decode(quantize_int8(model), prompts, 30, eos_id=50256, draft=None).tokens
    return fp32, int8, sample_indices(len(records), 8)


def test_int8_cost_measured_with_the_judge(
    varied: Path, records: list[dict], tokenizer_dir: Path
) -> None:
    fp32, int8, idx = _int8_setup(varied, records, tokenizer_dir)
    differ = [i for i in idx if fp32[i] != int8[i]]
    assert differ and len(differ) < len(idx)  # some responses change, some do not

    tok = Tokenizer.from_dir(tokenizer_dir)
    # the stub judge gives a response its length in characters (capped at 100)
    with OllamaStub(reply=lambda body: {"score": min(100, _judged_len(body))}) as stub:
        judge = JudgeConfig(hosts=[stub.host], backoff_s=0.01)
        args = ExtractArgs(max_new_tokens=30, batch_size=4, weights="int8", int8_check=8)
        got = extract_responses(varied, records, args, progress=False, judge=judge)
        sent = stub.chat_requests()
    assert [r["new_tokens"] for r in got.rows] == [len(t) for t in int8]  # int8 responses
    cost = got.int8_cost
    assert cost is not None and cost.examples == len(idx) == 8
    assert cost.fp32_tokens == sum(len(fp32[i]) for i in idx)
    assert cost.same_tokens == token_agreement([fp32[i] for i in idx], [int8[i] for i in idx])
    assert cost.identical_responses == len(idx) - len(differ)
    assert len(sent) == 2 * len(differ)  # identical responses are not sent
    change = sum(
        min(100, len(clean_response(tok.decode(int8[i]))))
        - min(100, len(clean_response(tok.decode(fp32[i]))))
        for i in differ
    ) / len(idx)
    judged = cost.judge["models"]["llama3"]
    assert judged["pairs_judged"] == len(differ) and judged["pairs_unscored"] == 0
    assert judged["mean_change"] == pytest.approx(change)
    line = cost.summary()
    assert f"{cost.identical_responses}/8 responses identical" in line and "llama3" in line


def _judged_len(body: dict) -> int:
    prompt = body["messages"][-1]["content"]
    return len(prompt.split("score the model response `", 1)[1].split("` on a scale", 1)[0])


def test_int8_cost_without_a_judge_says_so(varied: Path, records: list[dict]) -> None:
    args = ExtractArgs(max_new_tokens=30, batch_size=4, weights="int8", int8_check=8)
    down = JudgeConfig(hosts=["http://127.0.0.1:9"], retries=0, timeout_s=2)
    for judge, why in ((None, "no judge settings"), (down, "judge unavailable")):
        cost = extract_responses(varied, records, args, progress=False, judge=judge).int8_cost
        assert cost is not None and cost.examples == 8 and cost.identical_responses < 8
        assert cost.judge == {"measured": False, "reason": cost.judge["reason"]}
        assert why in cost.judge["reason"] and "not measured" in cost.summary()
    off = extract_responses(varied, records[:3], args.replace(int8_check=0), progress=False)
    assert off.int8_cost is None


def test_extract_settings_and_key() -> None:
    base = ExtractArgs()
    assert base.draft == "prompt_lookup" and base.weights == "fp32"
    key = base.key_dict()
    assert "draft" not in key and "draft_tokens" not in key  # exact: same responses
    assert key["weights"] == "fp32" and key["int8_check"] == 12
    assert base.replace(draft="none", draft_tokens=3).key_dict() == key
    assert base.replace(weights="int8").key_dict() == {**key, "weights": "int8"}
    for bad in ({"weights": "int4"}, {"draft": "model"}, {"draft_tokens": 0}):
        with pytest.raises(ValueError):
            ExtractArgs(**bad)
