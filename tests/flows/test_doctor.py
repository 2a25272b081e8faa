"""``gptflow doctor`` reports the mirror runs actually use: GPTFLOW_MIRROR, a
``download.mirror`` setting, or the one the latest run was given (``--mirror`` or a
deployment parameter) — no "inputs come from the web" warning when every run used a
mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.cli import main


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch):
    # nobody listens there: the server and judge checks answer at once
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("GPTFLOW_MIRROR", raising=False)
    before = dict(os.environ)
    yield
    os.environ.clear()  # doctor sets Prefect's variables for its process
    os.environ.update(before)


def _mirror_line(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    return next(x for x in out.splitlines() if " mirror " in x)


def _run_with(mirror: str | None) -> None:
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.migrate()
    cat.start_run("r-old", profile="smoke", config={"download": {"mirror": None}})
    cat.end_run("r-old", "completed")
    cat.start_run("r-new", profile="smoke", config={"download": {"mirror": mirror}})
    cat.end_run("r-new", "completed")


def test_the_mirror_of_the_latest_run_is_reported(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    _run_with(str(folder))
    main(["doctor"])
    line = _mirror_line(capsys)
    assert line.startswith("[ok  ]") and str(folder) in line and "r-new" in line, line
    assert "from the web" not in line


def test_a_mirror_gone_since_the_latest_run_is_a_warning(tmp_path: Path, capsys) -> None:
    _run_with(str(tmp_path / "gone"))
    main(["doctor"])
    line = _mirror_line(capsys)
    assert line.startswith("[warn]") and "gone" in line and "not a folder" in line, line


def test_the_environment_wins_and_a_missing_one_fails(tmp_path, monkeypatch, capsys) -> None:
    _run_with(str(tmp_path))
    monkeypatch.setenv("GPTFLOW_MIRROR", str(tmp_path / "nope"))
    assert main(["doctor"]) == 1
    line = _mirror_line(capsys)
    assert line.startswith("[FAIL]") and "GPTFLOW_MIRROR" in line and "nope" in line, line


def test_no_mirror_anywhere_is_said_without_a_warning(capsys) -> None:
    main(["doctor"])
    line = _mirror_line(capsys)
    assert line.startswith("[ok  ]") and "none" in line and "web" in line, line
