"""Fixtures of the fault-injection suite: tiny checkpoints saved in the test, a catalog
holding a few rows, and an isolated environment for subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _p in (str(REPO), str(REPO / "tests"), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _rel_helpers import TINY  # noqa: E402


@pytest.fixture
def lm_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A tiny language-model checkpoint folder with the tokenizer inside."""
    import torch

    from gpt.architecture import GPTConfig
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    return save_checkpoint(
        tmp_path / "lm", model, tokenizer_dir=tokenizer_dir, hparams={"lr": 1e-3}
    )


@pytest.fixture
def clf_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A tiny spam-classifier checkpoint (max_length 16) with the tokenizer inside."""
    import torch

    from gpt.architecture import GPTConfig
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT

    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY))
    model.replace_head(2)
    return save_checkpoint(
        tmp_path / "clf",
        model,
        tokenizer_dir=tokenizer_dir,
        labels=["ham", "spam"],
        meta={"max_length": 16, "pool": "last"},
    )


@pytest.fixture
def sub_env() -> dict[str, str]:
    """Environment for a child Python: the repo importable, the test's isolated paths,
    one thread (deterministic, and kind to the shared CPUs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONIOENCODING", None)
    return env
