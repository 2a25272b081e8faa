"""``gptflow run`` when the Prefect server is down: a local one is started (and is
healthy afterwards), a remote one that does not answer gives a clear message."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rel_helpers import free_port


@pytest.fixture
def clean_prefect_env(tmp_path: Path) -> Iterator[Path]:
    """No Prefect settings inherited; whatever configure_env() sets is undone."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("PREFECT_"):
            del os.environ[key]
    home = tmp_path / "prefect-home"
    os.environ["GPTFLOW_PREFECT_HOME"] = str(home)
    os.environ["GPTFLOW_PREFECT_PORT"] = str(free_port())
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Replace the flow by a stand-in that records whether the API was healthy."""
    import flows.pipeline
    from flows import server

    seen: list[bool] = []

    def fake(**kw: object) -> dict:
        seen.append(server.is_healthy(os.environ["PREFECT_API_URL"]))
        return {"run_id": "fake", "status": "completed", "stages": {}}

    monkeypatch.setattr(flows.pipeline, "run_pipeline", fake)
    return seen


def test_remote_api_down_gives_a_clear_message(
    clean_prefect_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    url = f"http://127.0.0.2:{free_port()}/api"  # not the local server gptflow manages
    os.environ["PREFECT_API_URL"] = url
    seen = _fake_pipeline(monkeypatch)
    rc = main(["run", "--profile", "smoke"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("gptflow run: error:") and url in err
    assert "unset PREFECT_API_URL" in err and "start it" in err
    assert seen == []  # the pipeline never started against a dead API
    assert not clean_prefect_env.exists()  # nothing was started locally either


@pytest.mark.slow
@pytest.mark.prefect
def test_local_server_down_is_started(
    clean_prefect_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows import server
    from flows.cli import main

    url = server.local_api_url()
    assert not server.is_healthy(url)
    seen = _fake_pipeline(monkeypatch)
    try:
        rc = main(["run", "--profile", "smoke"])
        assert rc == 0, capsys.readouterr().err
        assert seen == [True]  # the flow ran against a live server
        st = server.status()
        assert st["healthy"] and st["api_url"] == url
        assert st["managed_pid"] is not None
        assert (clean_prefect_env / ".db-migrated").exists()
        assert os.environ["PREFECT_HOME"] == str(clean_prefect_env)
        # a second `gptflow run` reuses the running server instead of starting another
        pid = st["managed_pid"]
        assert main(["run", "--profile", "smoke"]) == 0
        assert server.status()["managed_pid"] == pid
    finally:
        stopped = server.stop_server()
    assert stopped
    assert not server.is_healthy(url)
