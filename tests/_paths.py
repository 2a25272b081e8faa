"""Where the checkout and the test suite are, for tests at any depth under ``tests/``
(a test file computing ``Path(__file__).parents[n]`` breaks whenever it moves)."""

from __future__ import annotations

from pathlib import Path

#: The ``tests/`` folder (shared helpers such as ``_ci.py`` and ``_servers.py`` live here).
TESTS = Path(__file__).resolve().parent
#: The repository root (``pyproject.toml``, ``gpt/``, ``tasks/``, ``flows/``).
REPO = TESTS.parent
