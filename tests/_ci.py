"""Whether the tests run under CI, and what a missing prerequisite does there.

Under CI (``CI`` set to true/1/yes, as CI services set it) every prerequisite of the
suite — the verified input mirror, PostgreSQL, moto, and the dev dependencies such as
transformers, tensorflow and llms-from-scratch — is installed by the CI script, so a
missing one FAILS the tests that need it: a skip there would hide that they did not run.
Elsewhere (a laptop offline, a partial install) those tests are skipped with the reason.
The one helper the conftest, the test servers and the tests use.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, NoReturn

import pytest

#: Values of ``CI`` that mean "running under CI".
CI_VALUES = ("true", "1", "yes")


def in_ci() -> bool:
    """True under CI (``CI`` set to true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def unavailable(reason: str) -> NoReturn:
    """Fail the test under CI, skip it elsewhere; ``reason`` says what is missing. At
    module level it fails or skips the whole module."""
    if in_ci():
        pytest.fail(f"{reason} (under CI every prerequisite must be installed)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str) -> ModuleType:
    """Import ``name`` (a dev dependency); when it cannot be imported, fail under CI and
    skip elsewhere, saying why and how to install it (``reason``)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} cannot be imported ({exc}): {reason}")


class DevModule:
    """A dev dependency imported when a test first uses it (``require_module`` then), not
    when its file is collected: every worker process of ``make test`` collects every test
    file, and importing transformers, peft or tensorflow costs each one seconds of CPU.

    ``transformers = DevModule("transformers", "pip install -e '.[dev]'")`` at the top of
    a test file; ``transformers.GPT2Config(...)`` in a test imports it or fails/skips that
    test, saying why."""

    def __init__(self, name: str, reason: str) -> None:
        self._name = name
        self._reason = reason

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # pytest probing module globals at collection
            raise AttributeError(attr)
        return getattr(require_module(self._name, self._reason), attr)
