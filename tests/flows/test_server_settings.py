"""``gptflow server`` takes Prefect's own settings where a user gives them: the home from
``PREFECT_HOME`` (it read only ``GPTFLOW_PREFECT_HOME``), the port and listen address
from ``PREFECT_SERVER_API_PORT`` / ``PREFECT_SERVER_API_HOST``, the port of a local
``PREFECT_API_URL``; the ``GPTFLOW_`` variables win when both are set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows import server
from flows.cli import main

NAMES = (
    "PREFECT_HOME",
    "PREFECT_API_URL",
    "PREFECT_SERVER_API_PORT",
    "PREFECT_SERVER_API_HOST",
    "GPTFLOW_PREFECT_HOME",
    "GPTFLOW_PREFECT_PORT",
    "GPTFLOW_PREFECT_HOST",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):
    before = dict(os.environ)
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()  # configure_env sets Prefect's variables for the process
    os.environ.update(before)


def test_home_port_and_host_from_prefects_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4567")
    monkeypatch.setenv("PREFECT_SERVER_API_HOST", "0.0.0.0")
    assert server.server_paths().home == tmp_path / "ph"
    assert server.server_paths().logfile == tmp_path / "ph" / "server.log"
    assert server.local_api_url() == "http://127.0.0.1:4567/api"
    assert server.bind_host() == "0.0.0.0"
    assert server.configure_env() == "http://127.0.0.1:4567/api"
    assert server._server_env("http://127.0.0.1:4567/api")["PREFECT_HOME"] == str(tmp_path / "ph")


def test_gptflows_own_variables_win(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    monkeypatch.setenv("GPTFLOW_PREFECT_HOME", str(tmp_path / "gh"))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4567")
    monkeypatch.setenv("GPTFLOW_PREFECT_PORT", "4568")
    assert server.server_paths().home == tmp_path / "gh"
    assert server.local_api_url() == "http://127.0.0.1:4568/api"


def test_defaults_and_a_local_api_url(tmp_path: Path, monkeypatch) -> None:
    assert server.server_paths().home == Path(os.environ["GPTFLOW_ARTIFACTS"]) / "prefect"
    assert server.local_api_url() == "http://127.0.0.1:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")
    assert server.configure_env() == "http://127.0.0.1:4999/api"  # the server started there


def test_server_status_shows_the_home_in_use(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "9")  # nobody listens: down
    assert main(["server", "status"]) == 1
    out = capsys.readouterr().out
    assert f"prefect_home   {tmp_path / 'ph'}" in out and "http://127.0.0.1:9/api" in out


def test_a_port_that_is_no_number_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "forty-two")
    assert main(["server", "status"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptflow server: error: ") and "'forty-two'" in err and "\n" not in err
