"""The deployment guide (docs/deployments.md), through a real process worker.

The commands the guide gives, in its order: `gptflow deploy` (twice: it is idempotent)
from a shell *without* GPTFLOW_HOME, `prefect deployment run 'gptflow-pipeline/smoke'
--param …`, then `prefect worker start --pool gptflow` (``--run-once``) with GPTFLOW_HOME
set. The run must complete, and then:

- the flow run's logs (read back from the API) hold the library's own INFO lines
  (pretraining losses from ``gpt.train``, the spam classifier's per-epoch accuracies);
- ``runs.config`` records the mirror the run was given;
- every file the run wrote under artifacts/ shares one mode (0o666 less the umask);
- no artifact of the run links a ``file://`` path (a path on the worker's disk);
- the report artifact carries its plots as PNG data URIs, and no nan/<NA>;
- notebooks holding the catalog open (read-write and read-only) do not block the run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _paths import REPO
from helpers_fork import ForkServer

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def _env(server: dict, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GPTFLOW_HOME", None)
    env.update(
        PREFECT_API_URL=server["url"],
        PREFECT_HOME=str(server["home"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        # the library's import path for the subprocesses, as an editable install gives it
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.update(extra)
    return env


def _argv(module: str, args: list[str], cwd: Path) -> list[str]:
    """``python -m MODULE ARGS…`` run in ``cwd``, as a fork server's child (``-c``)."""
    code = (
        f"import os, runpy; os.chdir({str(cwd)!r}); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return ["-c", code, *args]


class _Commands:
    """The test's ``gptflow deploy`` and ``prefect deployment run`` commands, each a
    process of its own forked by one fork server that imported Prefect once (~1 CPU-s
    less per command; their PREFECT_* settings, which Prefect reads when imported, are
    ``_env``'s). The workers are not forked: a flow run tells a Prefect worker that
    started it by the worker's command line."""

    def __init__(self, server: dict, logs: Path) -> None:
        self.server = server
        self.children = ForkServer(_env(server), logs, preload=("prefect",))

    def __enter__(self) -> _Commands:
        return self

    def __exit__(self, *exc: object) -> None:
        self.children.close()

    def run(self, module: str, args: list[str], cwd: Path, timeout: float = 300) -> str:
        """``python -m MODULE ARGS…`` in ``cwd``: its stdout, once it exited 0."""
        name = f"{module}-{len(self.children.codes)}"
        self.children.start(name, _argv(module, args, cwd), env=_env(self.server))
        code, out, err = self.children.finish(name, timeout)
        assert code == 0, f"python -m {module} {' '.join(args)} -> {code}\n{out}\n{err}"
        return out


def _flow_runs(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )


def test_readme_deployment_walkthrough_through_a_worker(prefect_server, mirror, tmp_path):
    from helpers_notebook import Notebook
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from benchmarks.ollama_stub import OllamaStub
    from gpt.fileio import default_file_mode
    from gpt.paths import artifacts_dir
    from tasks.catalog import Catalog

    shell = tmp_path / "elsewhere"  # neither the clone nor GPTFLOW_HOME
    shell.mkdir()
    # the session's server may already hold the pool (an earlier deployment test)
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_work_pool("gptflow")
    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42").start()
    notebooks = []
    try:
        with _Commands(prefect_server, tmp_path / "commands") as commands:
            # 2. work pool + deployments, twice (the guide says: again after editing
            # prefect.yaml)
            first = commands.run("flows.cli", ["deploy"], REPO)
            assert "work pool 'gptflow': created" in first, first
            again = commands.run("flows.cli", ["deploy"], REPO)
            assert "work pool 'gptflow': exists" in again, again

            overrides = json.dumps([f"judge.hosts={stub.host}"])
            commands.run(
                "prefect",
                ["deployment", "run", "gptflow-pipeline/smoke",
                 "--param", f"mirror={mirror}", "--param", f"overrides={overrides}"],
                shell,
            )  # fmt: skip
            (run,) = _flow_runs("gptflow-pipeline/smoke")
            # notebooks hold the catalog open across the run (read-write from before it
            # starts, read-only from its first publish on): the run neither waits nor fails
            Catalog().migrate()
            notebooks = [
                Notebook(Catalog().path, read_only=False),
                Notebook(Catalog().path, read_only=True, after_publish=True),
            ]
        # 3. the worker, GPTFLOW_HOME set in *its* environment only
        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gptflow",
                 "--run-once"],
                cwd=shell,
                env=_env(prefect_server, GPTFLOW_HOME=str(REPO)),
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                worker.wait(timeout=540)
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait(timeout=30)
                pytest.fail("the worker did not finish the run:\n" + worker_log.read_text())
        notebooks[1].wait_open()
        assert notebooks[0].ask("sql SELECT count(*) FROM runs") == "0"  # its snapshot
        for nb in reversed(notebooks):  # on reconnect: the finished run
            assert nb.ask("reconnect") == "open"
            assert nb.ask("sql SELECT status FROM runs") == "completed"
            nb.close()
    finally:
        stub.stop()
        for nb in notebooks:
            nb.close()

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run.id).state
            if state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert state.is_completed(), f"{state.name}: {state.message}\n{worker_log.read_text()}"
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200
        )
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )

    # library lines in the flow run's logs
    by_logger = {}
    for line in logs:
        by_logger.setdefault(line.name, []).append(line.message)
    train = by_logger.get("gpt.train", [])
    assert any("train loss" in m and "val loss" in m for m in train), sorted(by_logger)
    spam = by_logger.get("gpt.recipes.classifier", [])
    assert any(re.search(r"epoch \d+ val loss .* accuracy", m) for m in spam), sorted(by_logger)

    # the mirror the run used is in its recorded config
    run_id = str(run.id)
    config = Catalog().query_df("SELECT config FROM runs WHERE run_id = ?", [run_id]).config[0]
    assert json.loads(config)["download"]["mirror"] == str(mirror)

    # one file mode for every output
    expected = default_file_mode()
    modes = {
        p.relative_to(artifacts_dir()).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in artifacts_dir().rglob("*")
        if p.is_file() and "prefect" not in p.parts
    }
    assert any(name.endswith("model.safetensors") for name in modes), modes
    wrong = {k: oct(v) for k, v in modes.items() if v != expected}
    assert not wrong, f"expected {oct(expected)}: {wrong}"

    # no artifact links to a file on the worker's disk (checkpoints are named by path)
    assert arts and not [a.key for a in arts if "file://" in str(a.data)]
    # the report: plots inline as PNG data URIs, nothing unreadable
    (md,) = [a.data for a in arts if a.key == "gptflow-report"]
    images = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(images) >= 4, md[:2000]
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", md)
    for bad in ("nan", "<NA>", "NaN", "None", "file://"):
        assert not re.search(rf"(?<![\w-]){re.escape(bad)}(?![\w-])", text), bad


def _wait(what: str, check, timeout: float = 300, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def _stage_running(run_id: str, stage: str):
    from gpt.paths import artifacts_dir

    def check():
        try:
            rec = json.loads((artifacts_dir() / "runs" / f"{run_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return rec if (rec.get("stages", {}).get(stage) or {}).get("status") == "running" else None

    return check


def _final_state(flow_run_id):
    from prefect.client.orchestration import get_client

    def check():
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state if state is not None and state.is_final() else None

    return check


def test_kill_9_of_a_flow_run_process_and_of_the_worker(prefect_server, mirror, tmp_path, capsys):
    """``kill -9`` of the flow-run process: the worker reports the flow run Crashed, and
    ``gptflow runs`` shows the run crashed with the reason. ``kill -9`` of the worker:
    the flow run stops, Crashed, saying the worker died (not a broken pipe) — in the
    UI's state message, the run record and the catalog — and the stage's progress
    marker says where it stopped."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.cli import main
    from tasks.catalog import Catalog
    from tasks.records.run_state import process_alive

    shell = tmp_path / "elsewhere"
    shell.mkdir()
    # a long pretraining, so that it is surely under way when the kill comes
    overrides = json.dumps(["pretrain.epochs=60", "judge.required=false"])
    commands = _Commands(prefect_server, tmp_path / "commands")

    def start_run() -> str:
        out = commands.run(
            "prefect",
            ["deployment", "run", "gptflow-pipeline/smoke",
             "--param", f"mirror={mirror}", "--param", f"overrides={overrides}"],
            shell,
        )  # fmt: skip
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def start_worker(log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gptflow"],
                cwd=shell,
                env=_env(prefect_server, GPTFLOW_HOME=str(REPO), PREFECT_WORKER_QUERY_SECONDS="1"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    workers = []
    with commands:
        commands.run("flows.cli", ["deploy"], REPO)
        try:
            # 1. the flow-run process is killed; the worker lives on
            first = start_run()
            workers.append(start_worker(tmp_path / "worker1.log"))
            rec = _wait("pretrain to start", _stage_running(first, "pretrain"), timeout=400)
            os.kill(rec["run"]["pid"], 9)
            state = _wait("the flow run to end", _final_state(first), timeout=120)
            assert state.is_crashed(), (state.name, state.message)
            assert main(["runs"]) == 0
            out = capsys.readouterr().out
            line = next(x for x in out.splitlines() if x.startswith(first))
            assert " crashed " in line, out
            assert f"{first}: run crashed: its process (PID {rec['run']['pid']} on " in out, out

            # 2. the worker is killed while its flow run trains
            second = start_run()
            rec = _wait("pretrain to start", _stage_running(second, "pretrain"), timeout=400)
            flow_pid = rec["run"]["pid"]
            workers[0].kill()
            workers[0].wait()
            state = _wait("the flow run to end", _final_state(second), timeout=120)
            _wait("the flow-run process to exit", lambda: not process_alive(flow_pid), timeout=60)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.terminate()
                    w.wait(timeout=60)
    says = f"the Prefect worker process (PID {workers[0].pid}) that started this flow run died"
    cat = Catalog()
    run = cat.query_df("SELECT status, message FROM runs WHERE run_id = ?", [second])
    assert run.status[0] == "crashed" and says in run.message[0], run.message[0]
    stage = cat.query_df(
        "SELECT status, message FROM stages WHERE run_id = ? AND stage = 'pretrain'", [second]
    )
    assert stage.status[0] == "failed" and "WorkerDiedError" in stage.message[0], stage.message[0]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[second]))
        )
    (bar,) = [a for a in arts if a.type == "progress"]
    assert "stopped at" in (bar.description or "") and says in bar.description, bar.description
