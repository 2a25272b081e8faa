"""``torch.compile`` as a training option (``LMTrainArgs.compile``) and a generation
option (``generate(compile=True)``): same numbers as eager. Compilation dominates the
time (tens of seconds even for a tiny model), hence one test, marked slow."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpt.generate import generate
from gpt.model import GPT, GPTConfig
from gpt.train import LMTrainArgs, train_lm

CFG = GPTConfig(vocab_size=101, context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (4, 17), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=2)


def _losses(compile: bool) -> tuple[list[float], GPT]:
    torch.manual_seed(0)
    model = GPT(CFG)
    args = LMTrainArgs(epochs=1, eval_every=1, eval_batches=1, compile=compile)
    res = train_lm(model, _loader(), None, args, progress=False)
    return [r["value"] for r in res.metrics if r["name"] == "loss" and r["split"] == "train"], model


@pytest.mark.slow
def test_compile_matches_eager_for_training_and_generation() -> None:
    eager, model = _losses(False)
    compiled, _ = _losses(True)
    assert len(eager) == 2 and compiled == pytest.approx(eager, abs=1e-5)
    prompt = [[5, 6, 7, 8, 9]]
    assert generate(model, prompt, 12, compile=True) == generate(model, prompt, 12)
