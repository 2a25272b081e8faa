"""``gptflow judge`` runs through the same run start as the flows
(:func:`flows.run_start.recorded_run`): a judge-only run beats its heartbeat while it
works and ends ``failed`` with the reason, and ``--run`` takes a unique prefix of an
existing run like every command that names a run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from benchmarks.ollama_stub import OllamaStub
from flows.cli import main
from tasks.catalog import Catalog


def _responses(path: Path, n: int = 2) -> str:
    path.write_text(
        json.dumps(
            [
                {"instruction": f"Name colour {i}.", "input": "", "output": "Blue.",
                 "model_response": f"colour {i}"}
                for i in range(n)
            ]
        ),
        encoding="utf-8",
    )  # fmt: skip
    return str(path)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run_row(db: Path, run_id: str) -> dict:
    (row,) = (
        Catalog(db).query_df("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_dict("records")
    )
    return row


def test_a_judge_run_beats_and_ends_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.records import run_state

    monkeypatch.setattr(run_state, "HEARTBEAT_EVERY", 0.05)
    monkeypatch.setattr(run_state, "PARENT_CHECK_EVERY", 0.05)
    db, path = tmp_path / "c.duckdb", _responses(tmp_path / "r.json")
    with OllamaStub(reply=lambda req: '{"score": 70}', latency_s=0.5) as stub:
        argv = ["judge", "--responses", path, "--run", "judge-x", "--host", stub.host]
        assert main([*argv, "--db", str(db), "--no-progress", "--concurrency", "1"]) == 0
    row = _run_row(db, "judge-x")
    assert (row["status"], row["profile"]) == ("completed", "judge")
    assert row["heartbeat_at"] > row["started_at"]  # it beat while the judge worked

    dead = f"http://127.0.0.1:{_closed_port()}"
    argv = ["judge", "--responses", path, "--run", "judge-y", "--host", dead, "--db", str(db)]
    assert main([*argv, "--no-progress"]) == 1
    assert "Ollama is not reachable" in capsys.readouterr().err
    row = _run_row(db, "judge-y")
    assert row["status"] == "failed"
    assert "Ollama is not reachable" in row["message"]  # the reason, not just "failed"


def test_run_takes_a_unique_prefix_of_an_existing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, path = tmp_path / "c.duckdb", _responses(tmp_path / "r.json")
    with OllamaStub(reply=lambda req: '{"score": 70}') as stub:

        def judge(run: str) -> int:
            argv = ["judge", "--responses", path, "--run", run, "--host", stub.host]
            return main([*argv, "--db", str(db), "--no-progress"])

        assert judge("judge-alpha-1") == 0
        capsys.readouterr()
        assert judge("judge-alpha") == 0  # a unique prefix: that run
        assert "under run 'judge-alpha-1'" in capsys.readouterr().out
        assert judge("judge-beta") == 0  # no run of that name or prefix: a new one
        assert "under run 'judge-beta'" in capsys.readouterr().out
        assert judge("judge-") == 1  # a prefix of both
    err = capsys.readouterr().err
    assert "ambiguous" in err and "judge-alpha-1" in err and "judge-beta" in err
    runs = Catalog(db).query_df("SELECT run_id FROM runs ORDER BY run_id")["run_id"].tolist()
    assert runs == ["judge-alpha-1", "judge-beta"]
