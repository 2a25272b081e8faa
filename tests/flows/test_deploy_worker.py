"""The README's deployment section, through a real process worker.

The commands the README gives, in its order: `gptflow deploy` (twice: it is idempotent)
from a shell *without* GPTFLOW_HOME, `prefect deployment run 'gptflow-pipeline/smoke'
--param …`, then `prefect worker start --pool gptflow` (``--run-once``) with GPTFLOW_HOME
set. The run must complete, and then:

- the flow run's logs (read back from the API) hold the library's own INFO lines
  (pretraining losses from ``gpt.train``, the spam classifier's per-epoch accuracies);
- ``runs.config`` records the mirror the run was given;
- every file the run wrote under artifacts/ shares one mode (0o666 less the umask);
- no artifact of the run links a ``file://`` path (a path on the worker's disk);
- the report artifact carries its plots as PNG data URIs, and no nan/<NA>.
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


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def _flow_runs(deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )


def test_readme_deployment_walkthrough_through_a_worker(prefect_server, mirror, tmp_path):
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
    cli = [sys.executable, "-m", "flows.cli"]
    # the session's server may already hold the pool (an earlier deployment test)
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_work_pool("gptflow")
    # 2. work pool + deployments, twice (the README says: again after editing prefect.yaml)
    first = _run([*cli, "deploy"], _env(prefect_server), REPO)
    assert "work pool 'gptflow': created" in first, first
    again = _run([*cli, "deploy"], _env(prefect_server), REPO)
    assert "work pool 'gptflow': exists" in again, again

    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42").start()
    try:
        overrides = json.dumps([f"judge.hosts={stub.host}"])
        _run(
            [sys.executable, "-m", "prefect", "deployment", "run", "gptflow-pipeline/smoke",
             "--param", f"mirror={mirror}", "--param", f"overrides={overrides}"],
            _env(prefect_server),
            shell,
        )  # fmt: skip
        (run,) = _flow_runs("gptflow-pipeline/smoke")
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
    finally:
        stub.stop()

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
