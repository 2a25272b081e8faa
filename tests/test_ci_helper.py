"""One CI helper (point 8 of issue 17): ``tests/_servers.py`` treated only ``CI=true`` as
CI while ``conftest.py`` accepted true/1/yes, and ``importorskip`` of transformers,
tensorflow and llms-from-scratch skipped under CI although they are dev dependencies.
Now every test reads CI through ``tests/_ci.py``: under CI a missing prerequisite fails,
elsewhere it skips with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import _ci
import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE", " Yes "])
def test_every_ci_value_fails_a_missing_server(value: str, monkeypatch) -> None:
    import _servers

    monkeypatch.setattr(_servers, "pg_binary", lambda name: None)
    monkeypatch.setenv("CI", value)
    with (
        pytest.raises(BaseException, match="PostgreSQL binaries") as info,
        _servers.postgres_server(),
    ):
        pass
    assert info.type is pytest.fail.Exception


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_outside_ci_a_missing_server_skips_with_the_reason(value: str, monkeypatch) -> None:
    import _servers

    monkeypatch.setattr(_servers, "pg_binary", lambda name: None)
    monkeypatch.setenv("CI", value)
    with (
        pytest.raises(BaseException, match="PostgreSQL binaries") as info,
        _servers.postgres_server(),
    ):
        pass
    assert info.type is pytest.skip.Exception


@pytest.mark.parametrize(("value", "outcome"), [("1", "fail"), ("", "skip")])
def test_a_dev_dependency_that_cannot_be_imported(value: str, outcome: str, monkeypatch) -> None:
    monkeypatch.setenv("CI", value)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(BaseException, match=r"gptflow_absent_module cannot be imported") as info:
        _ci.require_module("gptflow_absent_module", "pip install it")
    assert info.type is expected and "pip install it" in str(info.value)
    assert _ci.require_module("json", "stdlib").dumps([]) == "[]"


@pytest.mark.parametrize(("value", "outcome"), [("1", "fail"), ("", "skip")])
def test_a_dev_module_is_imported_at_first_use(value: str, outcome: str, monkeypatch) -> None:
    """``DevModule`` defers the import (and the fail/skip) from collection to the test."""
    monkeypatch.setenv("CI", value)
    absent = _ci.DevModule("gptflow_absent_module", "pip install it")  # nothing raised yet
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(BaseException, match=r"gptflow_absent_module cannot be imported") as info:
        absent.anything  # noqa: B018
    assert info.type is expected and "pip install it" in str(info.value)
    assert _ci.DevModule("json", "stdlib").dumps([]) == "[]"


def test_dev_dependencies_are_never_importorskipped() -> None:
    """transformers, tensorflow and llms-from-scratch are installed by ``make``: a test
    needing them goes through ``_ci.require_module``; nothing else reads ``CI``."""
    for path in TESTS.rglob("*.py"):
        if path.name in ("_ci.py", Path(__file__).name):
            continue
        text = path.read_text(encoding="utf-8")
        assert "importorskip(" not in text, path
        assert not re.search(r"environ(\.get)?[\[(]\s*[\"']CI[\"']", text), path
