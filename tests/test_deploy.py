"""Deployments and the judge-only flow.

- ``prefect.yaml`` parses, each entrypoint loads as a Prefect flow with Prefect's own
  loader, and ``prefect --no-prompt deploy --all`` accepts it against a local server;
  the deployments read back from the API carry the names, cron schedules, parameters and
  pull step written in the file.
- ``gptflow-judge`` against a loopback Ollama stand-in: judgments written, a second run
  sends nothing; an unreachable judge gives a Skipped stage (required false) or a failed
  flow run (required true), with the fix recorded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_YAML = REPO / "prefect.yaml"


def _cli(args: list[str], server: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=server["url"],
        PREFECT_HOME=str(server["home"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------- prefect.yaml


def _spec() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def test_prefect_yaml_parses_and_entrypoints_load():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    spec = _spec()
    assert spec["name"] == "gptflow"
    assert not spec.get("build") and not spec.get("push")
    (step,) = spec["pull"]
    assert step == {
        "prefect.deployments.steps.set_working_directory": {"directory": "{{ $GPTFLOW_HOME }}"}
    }
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"nightly", "smoke", "judge-rescore"}
    expected_flow = {
        "nightly": "gptflow-pipeline",
        "smoke": "gptflow-pipeline",
        "judge-rescore": "gptflow-judge",
    }
    for name, dep in deps.items():
        assert dep["work_pool"]["name"] == "gptflow"
        path, _, func = dep["entrypoint"].partition(":")
        assert (REPO / path).is_file(), dep["entrypoint"]
        loaded = load_flow_from_entrypoint(str(REPO / path) + ":" + func)
        assert isinstance(loaded, Flow)
        assert loaded.name == expected_flow[name]
        # every parameter the file sets is one the flow accepts
        assert set(dep.get("parameters", {})) <= set(loaded.parameters.properties), name


def test_nightly_enforces_the_regression_gates():
    """The scheduled run fails its flow run when a regression gate fails."""
    from flows.config import build_config

    nightly = next(d for d in _spec()["deployments"] if d["name"] == "nightly")
    cfg = build_config(nightly["parameters"]["profile"], nightly["parameters"]["overrides"])
    assert cfg.judge.required is True
    assert cfg.gates.enabled is True and cfg.gates.fail_run is True
    assert cfg.gates.spam_test_max_drop == 1.0 and cfg.gates.judge_mean_must_not_drop


def test_pull_step_resolves_from_the_environment(prefect_server, tmp_path, monkeypatch):
    """The worker-side templating Prefect applies to pull steps turns the placeholder
    into GPTFLOW_HOME and the step changes into that folder (the server fixture keeps
    Prefect's step machinery off its ephemeral mode)."""
    import asyncio

    from prefect.deployments.steps.core import run_steps

    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    before = os.getcwd()
    try:
        out = asyncio.run(run_steps(_spec()["pull"], print_function=lambda *a: None))
        assert Path(os.getcwd()).resolve() == tmp_path.resolve()
    finally:
        os.chdir(before)
    assert isinstance(out, dict)


def test_prefect_deploy_accepts_the_file(prefect_server):
    from prefect.client.orchestration import get_client

    _cli(["work-pool", "create", "gptflow", "--type", "process"], prefect_server)
    proc = _cli(["--no-prompt", "deploy", "--all"], prefect_server, timeout=300)
    for name in (
        "gptflow-pipeline/nightly",
        "gptflow-pipeline/smoke",
        "gptflow-judge/judge-rescore",
    ):
        assert name in proc.stdout, proc.stdout

    with get_client(sync_client=True) as client:
        deps = {
            name: client.read_deployment_by_name(name)
            for name in (
                "gptflow-pipeline/nightly",
                "gptflow-pipeline/smoke",
                "gptflow-judge/judge-rescore",
            )
        }
    nightly = deps["gptflow-pipeline/nightly"]
    assert nightly.entrypoint == "flows/pipeline.py:gptflow_pipeline"
    assert nightly.work_pool_name == "gptflow"
    assert nightly.parameters == {
        "profile": "cpu",
        "overrides": ["judge.required=true", "gates.fail_run=true"],
    }
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
        ("0 3 * * *", "UTC", True)
    ]
    assert nightly.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $GPTFLOW_HOME }}"}}
    ]
    smoke = deps["gptflow-pipeline/smoke"]
    assert smoke.parameters == {"profile": "smoke"}
    assert smoke.schedules == []
    judge = deps["gptflow-judge/judge-rescore"]
    assert judge.entrypoint == "flows/judge_flow.py:gptflow_judge"
    assert judge.parameters == {"profile": "cpu", "required": True}
    assert [s.schedule.cron for s in judge.schedules] == ["0 5 * * 0"]
    assert set(judge.parameter_openapi_schema["properties"]) == {
        "responses_run",
        "profile",
        "overrides",
        "required",
    }


# --------------------------------------------------------------------------- judge flow


def _responses(run_id: str, n: int) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "example_id": i,
            "instruction": f"Add {i} and 1.",
            "input": "",
            "output": str(i + 1),
            "response": str(i + 1),
            "new_tokens": 1,
            "seconds": 0.01,
        }
        for i in range(n)
    ]


def _stage(run_id: str) -> dict:
    from tasks.catalog import Catalog

    df = Catalog().query_df(
        "SELECT status, cache_hit, outputs, message FROM stages WHERE run_id = ? AND stage = ?",
        [run_id, "judge"],
    )
    assert len(df) == 1, df
    return df.iloc[0].to_dict()


def _task_state_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [r.state.name for r in runs]


def test_judge_flow_scores_then_resumes(prefect_server):
    import json

    from prefect.client.orchestration import get_client

    from benchmarks.ollama_stub import OllamaStub
    from flows.judge_flow import gptflow_judge
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.migrate()
    cat.start_run("r0", profile="smoke")
    cat.replace_rows("responses", _responses("r0", 2), where={"run_id": "r0"})
    cat.start_run("r1", profile="smoke")  # started after r0: the latest
    cat.replace_rows("responses", _responses("r1", 3), where={"run_id": "r1"})

    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 77").start()
    try:
        overrides = [f"judge.host={stub.host}", "judge.retries=0"]
        state = gptflow_judge(profile="smoke", overrides=overrides, return_state=True)
        assert state.is_completed(), state.message
        res = state.result()
        run1 = str(state.state_details.flow_run_id)
        assert res["run_id"] == run1
        assert res["responses_run_id"] == "r1"
        assert (res["n_sent"], res["n_scored"], res["n_skipped"]) == (3, 3, 0)
        assert stub.chat_count == 3

        scores = cat.query_df(
            "SELECT run_id, example_id, score FROM judgments ORDER BY run_id, example_id"
        )
        assert scores.to_dict("records") == [
            {"run_id": "r1", "example_id": i, "score": 77} for i in range(3)
        ]
        row = _stage(run1)
        assert row["status"] == "completed" and not row["cache_hit"]
        assert json.loads(row["outputs"])["n_sent"] == 3
        run_row = cat.query_df("SELECT profile, status FROM runs WHERE run_id = ?", [run1])
        assert run_row.to_dict("records") == [{"profile": "smoke", "status": "completed"}]

        with get_client(sync_client=True) as client:
            art = client.read_latest_artifacts()
        tables = [a for a in art if a.key == "eval-summary"]
        assert len(tables) == 1
        data = tables[0].data if isinstance(tables[0].data, list) else json.loads(tables[0].data)
        assert data[0]["run_id"] == "r1" and data[0]["n"] == 3
        assert data[0]["mean_score"] == 77.0

        # a second run: everything is judged already, nothing is sent
        state2 = gptflow_judge(
            responses_run="r1", profile="smoke", overrides=overrides, return_state=True
        )
        assert state2.is_completed(), state2.message
        res2 = state2.result()
        assert (res2["n_sent"], res2["n_skipped"]) == (0, 3)
        assert stub.chat_count == 3
        row2 = _stage(str(state2.state_details.flow_run_id))
        assert row2["status"] == "cached" and row2["cache_hit"]
        assert cat.query_df("SELECT count(*) AS n FROM judgments")["n"].iloc[0] == 3
    finally:
        stub.stop()


def test_judge_flow_unreachable_judge(prefect_server):
    from flows.judge_flow import gptflow_judge
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.migrate()
    cat.replace_rows("responses", _responses("r1", 2), where={"run_id": "r1"})
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    overrides = [f"judge.host={dead}", "judge.retries=0", "judge.timeout_s=3"]

    state = gptflow_judge(profile="smoke", overrides=overrides, required=False, return_state=True)
    assert state.is_completed(), state.message
    run_id = str(state.state_details.flow_run_id)
    assert state.result()["status"] == "skipped"
    row = _stage(run_id)
    assert row["status"] == "skipped"
    for part in (dead, "ollama serve", "ollama pull llama3", "gptflow-judge/judge-rescore"):
        assert part in row["message"], row["message"]
    assert _task_state_names(state.state_details.flow_run_id) == ["Skipped"]
    assert cat.query_df("SELECT count(*) AS n FROM judgments")["n"].iloc[0] == 0

    failed = gptflow_judge(profile="smoke", overrides=overrides, required=True, return_state=True)
    assert failed.is_failed()
    assert "ollama serve" in failed.message and "ollama pull llama3" in failed.message
    failed_id = str(failed.state_details.flow_run_id)
    assert _stage(failed_id)["status"] == "failed"
    assert _task_state_names(failed.state_details.flow_run_id) == ["Failed"]
    runs = cat.query_df("SELECT status FROM runs WHERE run_id = ?", [failed_id])
    assert runs["status"].tolist() == ["failed"]
