"""One line per error, everywhere: every command's user errors end in exactly one line
``gptflow CMD: error: …`` that names the thing (a run, file, field, query, URL), with
exit status 1 (2 for a command line the parser rejects); every command takes a unique
prefix of a run id, and an ambiguous one lists the candidates; output cut short by a
closed pipe ends quietly; a deployment run logs a user error as one ERROR line and its
traceback at DEBUG.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _paths import REPO

from flows.cli import EXIT_PIPE_CLOSED, main

RUNS = ("e0c8c7fc-1111", "e0c8c7fc-2222", "ab12cd34-5678")
DEAD_API = "http://localhost:9/api"  # refused at once; not a server gptflow may start

#: (argv, what the line must name). ``{x}`` are filled from the ``world`` fixture;
#: ``ENV=VALUE`` items before the command are set in the environment.
ERRORS = [
    # a run by an id prefix: every command that takes a run
    ("runs e0c8", ["'e0c8'", "ambiguous", RUNS[0], RUNS[1]]),
    ("runs zz", ["'zz'", "gptflow runs"]),
    ("report e0c8", ["'e0c8'", "ambiguous", RUNS[0], RUNS[1]]),
    ("report zz", ["'zz'"]),
    ("evals --run zz", ["'zz'"]),
    ("evals --run e0c8c7fc", ["'e0c8c7fc'", RUNS[0], RUNS[1]]),
    ("compare zz", ["'zz'"]),
    ("compare ab12 e0c8", ["'e0c8'", RUNS[0], RUNS[1]]),
    ("rerun pretrain --run zz", ["'zz'"]),
    ("rerun pretrain --run e0c8", ["'e0c8'", RUNS[0], RUNS[1]]),
    ("judge --responses {dir}/ok.json --run e0c8", ["'e0c8'", RUNS[0], RUNS[1]]),
    # settings
    ("run --set pretrain.nosuch=1", ["pretrain.nosuch"]),
    ("run --set pretrain.epochs=-1", ["pretrain.epochs"]),
    ("run --set nonsense", ["'nonsense'", "stage.field=value"]),
    ("run --profile smoke --set tokenize.max_length=abc", ["tokenize.max_length"]),
    ("runs --limit 0", ["--limit"]),
    ("evals --worst 0", ["--worst"]),
    # catalogs and queries
    ("runs --db {dir}/none.duckdb", ["none.duckdb"]),
    ("sql --db {dir}/none.duckdb 'SELECT 1'", ["none.duckdb"]),
    ("sql 'SELECT * FROM nosuch_table'", ["nosuch_table", "does not exist"]),
    ("sql 'SELEC 1'", ["SELEC"]),
    ("sql 'DELETE FROM runs'", ["read-only", "DELETE"]),
    ("sql ' -- only a comment'", ["no statement"]),
    ("catalog rebuild --db {db}", ["artifacts", "does not exist", "--artifacts"]),
    ("report --html {file}/r.html ab12", ["r.html"]),
    # checkpoints, files, exports
    ("generate --checkpoint {dir}/missing --prompt hi", ["missing"]),
    ("generate --checkpoint {clf} --prompt hi", ["classifier", "gptflow classify"]),
    ("generate --checkpoint {lm} --prompt hi --max-new-tokens -3", ["--max-new-tokens"]),
    ("generate --checkpoint {lm} --instruction x --prompt y", ["--prompt", "--instruction"]),
    ("classify --checkpoint {lm} hi", ["lm", "classifier"]),
    ("classify --checkpoint {dir}/missing hi", ["missing"]),
    ("export {dir}/missing --format hf --out {dir}/x", ["missing"]),
    ("export {lm} --format hf --out {dir}/exists", ["exists", "--force"]),
    ("convert-gpt2 --openai-dir {dir}/missing --out {dir}/y", ["hparams.json"]),
    ("judge --responses {dir}/missing.json", ["missing.json"]),
    ("judge --responses {dir}/bad.json", ["bad.json", "JSON"]),
    ("judge --responses {dir}/noresp.json", ["noresp.json", "'output'"]),
    ("download --only nosuch", ["'nosuch'"]),
    ("download --mirror {dir}/nomirror", ["nomirror"]),
    # the Prefect server
    (f"PREFECT_API_URL={DEAD_API} deploy", [DEAD_API]),
    (f"PREFECT_API_URL={DEAD_API} server start", [DEAD_API]),
    (f"PREFECT_API_URL={DEAD_API} run --profile smoke", [DEAD_API]),
]

#: Command lines the parser rejects: one line too, exit status 2.
USAGE = [
    ("nosuch", ["'nosuch'"]),
    ("rerun nosuch", ["'nosuch'"]),
    ("runs --limit x", ["--limit"]),
    ("bench --only nosuch", ["'nosuch'"]),
    ("export {lm} --format onnx --out {dir}/o", ["onnx"]),
    ("classify --checkpoint {clf}", ["TEXT"]),
]


@pytest.fixture(autouse=True)
def _environment_kept():
    """Commands that reach for the Prefect server set its variables for their process;
    put the environment back."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, str]:
    """A catalog with three runs (two sharing a prefix), an LM and a classifier checkpoint
    and a few files; paths by name."""
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT, GPTConfig
    from tasks.catalog import Catalog

    d = tmp_path_factory.mktemp("errors")
    cat = Catalog(d / "c.duckdb")
    cat.migrate()
    for run in RUNS:
        cat.start_run(run, profile="smoke")
        cat.record_stage(run, "download", status="completed")
        cat.end_run(run, "completed")
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2)
    save_checkpoint(d / "lm", GPT(cfg), tokenizer_dir=tokenizer_dir)
    clf = GPT(cfg)
    clf.replace_head(2)
    save_checkpoint(d / "clf", clf, tokenizer_dir=tokenizer_dir, labels=["ham", "spam"])
    (d / "bad.json").write_text('{"bad json', encoding="utf-8")
    (d / "noresp.json").write_text('[{"instruction": "x"}]', encoding="utf-8")
    ok = [{"instruction": "x", "input": "", "output": "y", "model_response": "z"}]
    (d / "ok.json").write_text(json.dumps(ok), encoding="utf-8")
    (d / "exists").mkdir()
    (d / "file").write_text("a file, not a folder", encoding="utf-8")
    return {
        "dir": str(d),
        "db": str(d / "c.duckdb"),
        "lm": str(d / "lm"),
        "clf": str(d / "clf"),
        "file": str(d / "file"),
    }


def _argv(line: str, world: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import shlex

    words = shlex.split(line.format(**world))
    while words and "=" in words[0] and words[0].split("=")[0].isupper():
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    return words


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("line", "names"), ERRORS, ids=[e[0] for e in ERRORS])
def test_a_user_error_is_one_line_naming_the_thing(
    line: str, names: list[str], world, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("GPTFLOW_DB", world["db"])
    argv = _argv(line, world, monkeypatch)
    code = main(argv)
    got = _one_line(capsys)
    assert code == 1, got
    assert got.startswith(f"gptflow {argv[0]}: error: "), got
    assert "Traceback" not in got and "LINE 1" not in got
    for name in names:
        assert name.format(**world) in got, (name, got)


@pytest.mark.parametrize(("line", "names"), USAGE, ids=[e[0] for e in USAGE])
def test_a_rejected_command_line_is_one_line(
    line: str, names: list[str], world, monkeypatch, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_argv(line, world, monkeypatch))
    got = _one_line(capsys)
    assert exit_.value.code == 2, got
    assert got.startswith("gptflow") and ": error: " in got and "--help" in got
    for name in names:
        assert name in got, (name, got)


def test_the_list_covers_every_command() -> None:
    from flows.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    tried = {line.split()[0] for line, _ in ERRORS if "=" not in line.split()[0]}
    tried |= {line.split()[1] for line, _ in ERRORS if "=" in line.split()[0]}
    tried |= {"bench"}  # its only user error is a rejected --only (USAGE)
    assert commands - tried <= {"doctor"}, commands - tried  # doctor reports, never fails
    assert len(ERRORS) >= 30


def test_a_unique_prefix_names_the_run(world, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GPTFLOW_DB", world["db"])
    assert main(["runs", "ab12"]) == 0
    assert "download" in capsys.readouterr().out
    assert main(["evals", "--run", "ab12cd"]) == 0
    assert "run ab12cd34-5678 has no judge stage" in capsys.readouterr().err
    assert main(["report", "ab12"]) == 0
    assert "ab12cd34-5678" in capsys.readouterr().out


def test_sql_verbose_shows_duckdbs_whole_message(world, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GPTFLOW_DB", world["db"])
    assert main(["sql", "-v", "SELECT * FROM nosuch_table"]) == 1
    err = capsys.readouterr().err
    assert "LINE 1: SELECT * FROM nosuch_table" in err and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("gptflow sql: error: ")


def test_output_to_a_closed_pipe_ends_quietly(world) -> None:
    """`gptflow runs | head -1`: the reader is gone before gptflow writes; no
    BrokenPipeError traceback, no "Exception ignored" at exit."""
    env = {**os.environ, "GPTFLOW_DB": world["db"], "PYTHONPATH": str(REPO)}
    for argv in (["runs"], ["sql", "SELECT * FROM range(1000)"]):
        r, w = os.pipe()
        os.close(r)
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
        os.close(w)
        assert proc.returncode == EXIT_PIPE_CLOSED, proc.stderr
        assert proc.stderr == "", proc.stderr


def _flow_logs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list:
        async with get_client() as client:
            await asyncio.sleep(2)  # the API log worker sends in batches
            return await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )

    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    return asyncio.run(read())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"overrides": ["pretrain.nosuch=1"]}, ["ConfigError", "pretrain.nosuch"]),
        ({"mirror": "/nonexistent-mirror"}, ["ConfigError", "/nonexistent-mirror"]),
    ],
    ids=["bad override (the flow)", "bad mirror (a stage task)"],
)
def test_a_deployment_run_logs_a_user_error_in_one_line(
    prefect_server, mirror, kwargs, names
) -> None:
    """What a worker's flow run sends to the UI: one ERROR line naming the problem (not
    the engines' tracebacks), the traceback at DEBUG, the run Failed."""
    from flows.pipeline import gptflow_pipeline

    state = gptflow_pipeline(profile="smoke", progress=False, return_state=True, **kwargs)
    assert state.is_failed()
    logs = _flow_logs(state.state_details.flow_run_id)
    errors = [x.message for x in logs if x.level >= 40]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for name in names:
        assert name in errors[0], errors
    debug = [x.message for x in logs if x.level == 10]
    assert any("Traceback (most recent call last)" in m for m in debug), debug
