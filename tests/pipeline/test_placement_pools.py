"""Stages on work pools through real Prefect workers (docs/deployments.md, "Stages on work pools").

A local Prefect server, ``gptflow deploy`` (the pools and the ``gptflow-stage/<pool>``
deployments of prefect.yaml), two process workers on the pools ``cpu`` (created by its
worker) and ``gpu`` —
two processes on this one machine, told apart by pool and worker name, sharing the
artifacts folder and catalog as two machines would share storage. Then the smoke
pipeline with ``pretrain`` and ``finetune_instruct`` placed on ``gpu``:

- both ran on the gpu worker: their ``stages`` rows name pool ``gpu``, the worker and the
  child flow run, and those flow runs are subflows of the run on the ``gpu`` pool, run
  by that worker; every other stage ran in the flow's own process; the cpu worker ran
  nothing;
- the results are an unplaced run's: the same pipeline unplaced is all cache hits;
- a placed rerun is all cache hits, and starts no flow run on any pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _paths import REPO

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

PLACED = {"pretrain": "gpu", "finetune_instruct": "gpu"}
WORKERS = {"gpu": "gpu-box", "cpu": "cpu-box"}


def _env(server: dict, **extra: str) -> dict[str, str]:
    env = dict(os.environ)  # GPTFLOW_DB/ARTIFACTS/DATASETS/MIRROR: shared with the workers
    env.update(
        PREFECT_API_URL=server["url"],
        PREFECT_HOME=str(server["home"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def _workers(server: dict, logs: Path):
    """One process worker per pool of WORKERS, stopped with SIGTERM (SIGINT is slow)."""
    procs = {}
    try:
        for pool, name in WORKERS.items():
            out = (logs / f"worker-{pool}.log").open("w")
            procs[pool] = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                 "--name", name, "--type", "process"],
                cwd=logs,
                env=_env(server, GPTFLOW_HOME=str(REPO)),
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_online(procs, logs)
        yield procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_online(procs: dict, logs: Path, timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    def workers(client, pool: str) -> list:
        try:
            return client.read_workers_for_work_pool(pool)
        except PrefectHTTPStatusError:  # the cpu pool: created by its worker when it starts
            return []

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            online = {
                pool
                for pool, name in WORKERS.items()
                if any(
                    w.name == name and str(w.status).upper().endswith("ONLINE")
                    for w in workers(client, pool)
                )
            }
            if online == set(WORKERS):
                return
            dead = [p for p, proc in procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                text = "\n".join((logs / f"worker-{p}.log").read_text() for p in WORKERS)
                pytest.fail(f"workers not online ({sorted(online)}; exited: {dead}):\n{text}")
            time.sleep(0.5)


def _rows(run_id: str) -> dict[str, dict]:
    from tasks.catalog import Catalog

    df = Catalog().query_df(
        "SELECT stage, status, cache_hit, outputs FROM stages WHERE run_id = ?", [run_id]
    )
    return {
        r["stage"]: {**r, "outputs": json.loads(r["outputs"]) if r["outputs"] else {}}
        for r in df.to_dict("records")
    }


def _pool_runs(pool: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
        )


def test_stages_placed_on_a_gpu_pool_run_on_its_worker(
    prefect_server, mirror, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from benchmarks.ollama_stub import OllamaStub
    from flows.pipeline import run_pipeline

    monkeypatch.setenv("GPTFLOW_MIRROR", str(mirror))  # for the flow and the workers alike
    # the pools and deployments, as docs/deployments.md says
    deployed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy"],
        cwd=REPO,
        env=_env(prefect_server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "work pool 'gpu':" in deployed.stdout, deployed.stdout
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("gptflow-stage/gpu")
    assert dep.work_pool_name == "gpu"
    assert dep.entrypoint == "flows/stage_flow.py:gptflow_stage"
    before = {pool: len(_pool_runs(pool)) for pool in WORKERS}

    placed = [f"placement.{stage}={pool}" for stage, pool in PLACED.items()]
    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42").start()
    judge = [f"judge.hosts={stub.host}"]
    try:
        with _workers(prefect_server, tmp_path):
            first = run_pipeline("smoke", judge + placed, progress=False)
            unplaced = run_pipeline("smoke", judge, progress=False)
            again = run_pipeline("smoke", judge + placed, progress=False)
    finally:
        stub.stop()
    logs = "\n".join((tmp_path / f"worker-{p}.log").read_text()[-3000:] for p in WORKERS)
    assert first["status"] == "completed", (first, logs)

    # 1. the placed stages ran on the gpu worker, the others in the flow's process
    rows = _rows(first["run_id"])
    assert set(rows) == set(first["stages"]) and len(rows) == 9
    assert all(not r["cache_hit"] for s, r in rows.items() if s != "download"), rows
    for stage, r in rows.items():
        where = r["outputs"]
        if stage in PLACED:
            assert r["status"] == "completed", (stage, r)
            assert where["pool"] == "gpu" and where["worker"] == WORKERS["gpu"], where
            assert where["host"] and where["flow_run_id"], where
            assert where["pid"] != os.getpid()  # another process: the worker's flow run
        else:
            assert "pool" not in where and "flow_run_id" not in where, (stage, where)
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first["run_id"]])
            )
        )
    by_stage = {c.parameters["stage"]: c for c in children}
    assert set(by_stage) == set(PLACED), [c.name for c in children]
    for stage, child in by_stage.items():
        assert child.state.is_completed(), child.state
        assert child.work_pool_name == "gpu"
        assert child.labels.get("prefect.worker.name") == WORKERS["gpu"]
        assert str(child.id) == rows[stage]["outputs"]["flow_run_id"]
    assert len(_pool_runs("gpu")) == before["gpu"] + len(PLACED)
    assert len(_pool_runs("cpu")) == before["cpu"]  # the cpu worker ran nothing

    # 2. the same results as in-process: an unplaced run is all cache hits
    assert unplaced["status"] == "completed", unplaced
    assert all(s["cache_hit"] for s in unplaced["stages"].values()), unplaced["stages"]
    rows_unplaced = _rows(unplaced["run_id"])
    for stage in set(rows) - {"download"}:
        mine, theirs = rows[stage]["outputs"], rows_unplaced[stage]["outputs"]
        assert (mine["key"], mine["digest"]) == (theirs["key"], theirs["digest"]), stage
        assert theirs["producer_run_id"] == first["run_id"]

    # 3. a placed rerun is all cache hits, served without starting any flow run
    assert again["status"] == "completed", again
    assert all(s["cache_hit"] for s in again["stages"].values()), again["stages"]
    assert len(_pool_runs("gpu")) == before["gpu"] + len(PLACED)
