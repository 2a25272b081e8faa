"""Observation 6: ``gptflow runs`` never cuts a stage's status (a skipped judge stays
visible, with its message), and ``gptflow evals`` says why its summary is empty (the
judge stage's message with the fix, or what to run first)."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from tasks.stages import STAGES

SKIP_MSG = (
    "Ollama is not reachable at http://127.0.0.1:11434 — start it with `ollama serve` — "
    "fix: start Ollama with `ollama serve`, pull the judge with `ollama pull llama3`, then "
    "run `gptflow rerun judge`"
)


@pytest.fixture
def cat():
    from tasks.catalog import Catalog

    c = Catalog()
    c.migrate()
    return c


def _run(cat, run_id: str, judge: str | None, message: str | None = None) -> None:
    cat.start_run(run_id, profile="smoke")
    for stage in STAGES:
        if stage == "judge":
            if judge is not None:
                cat.record_stage(run_id, stage, status=judge, message=message)
            continue
        cat.record_stage(run_id, stage, status="running")
        cat.record_stage(run_id, stage, status="cached" if stage == "download" else "completed")
    cat.end_run(run_id, "completed")


def test_runs_shows_every_stage_status(cat, capsys):
    _run(cat, "run-with-a-long-identifier-0001", "skipped", SKIP_MSG)
    _run(cat, "run-with-a-long-identifier-0002", "completed")
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("run-with-a-long-identifier-0001"))
    assert "judge skipped" in line and "8 ok" in line and "..." not in line, line
    ok = next(x for x in out.splitlines() if x.startswith("run-with-a-long-identifier-0002"))
    assert "9 ok" in ok
    # the reason is printed whole, under the table
    assert SKIP_MSG in out

    # one line per stage for one run
    assert main(["runs", "run-with-a-long-identifier-0001"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert any(x.startswith(stage + " ") for x in out.splitlines()), (stage, out)
    assert SKIP_MSG in out

    # JSON: the stages as a list, nothing cut
    assert main(["runs", "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    judge = [s for s in runs[-1]["stages"] if s["stage"] == "judge"]
    assert judge == [
        {"stage": "judge", "status": "skipped", "cache_hit": None, "message": SKIP_MSG}
    ]


def test_evals_says_why_the_summary_is_empty(cat, capsys):
    assert main(["evals"]) == 0
    err = capsys.readouterr().err
    assert "no runs" in err and "gptflow run" in err, err

    _run(cat, "r1", "skipped", SKIP_MSG)
    assert main(["evals"]) == 0
    err = capsys.readouterr().err
    assert "judge stage of run r1 was skipped" in err and SKIP_MSG in err, err
    assert main(["evals", "--run", "r1", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"] == []
    assert SKIP_MSG in captured.err

    assert main(["evals", "--run", "typo"]) == 1  # a run that does not exist: an error
    assert "no run 'typo' in the catalog" in capsys.readouterr().err

    _run(cat, "r2", None)  # a run whose judge never ran (e.g. it failed before)
    assert main(["evals", "--run", "r2"]) == 0
    err = capsys.readouterr().err
    assert "run r2 has no judge stage" in err and "gptflow rerun judge" in err, err
