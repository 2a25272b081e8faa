"""Shared fixtures.

``mirror`` is a folder laid out like the download mirror (datasets at the top, GPT-2
tokenizer files under ``gpt2/``). In this workplace it is ``../shared/data``; on a user's
machine the real inputs are fetched once into a cache folder, or the tests that need
them are skipped with the reason when that fails (offline).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_mirror() -> Path | None:
    env = os.environ.get("GPTFLOW_TEST_MIRROR")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data"
    if (shared / "the-verdict.txt").exists():
        return shared
    return None


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local mirror folder holding the real public inputs."""
    found = _find_mirror()
    if found is not None:
        return found
    cache = Path(os.environ.get("GPTFLOW_TEST_CACHE", Path.home() / ".cache" / "gptflow-inputs"))
    try:
        from gpt.download import download_sources

        download_sources(
            ["the-verdict", "sms-spam", "instruction-data", "gpt2-tokenizer"], dest=cache
        )
    except Exception as exc:  # offline or blocked: say why
        pytest.skip(f"real inputs unavailable (no ../shared/data mirror and download failed: {exc})")
    return cache


@pytest.fixture(scope="session")
def tokenizer_dir(mirror: Path) -> Path:
    """Folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``."""
    return mirror / "gpt2"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test writes its catalog, artifacts and downloads under its own tmp folder."""
    monkeypatch.setenv("GPTFLOW_DB", str(tmp_path / "catalog.duckdb"))
    monkeypatch.setenv("GPTFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("GPTFLOW_DATASETS", str(tmp_path / "datasets"))
