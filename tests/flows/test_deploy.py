"""Deployments and the judge-only flow.

- ``prefect.yaml`` parses, each entrypoint loads as a Prefect flow with Prefect's own
  loader, and the deployment guide's commands (``prefect work-pool create … --overwrite``, twice,
  and ``prefect --no-prompt deploy --all``) succeed against a local server; the
  deployments read back from the API carry the names, cron schedules, parameters and
  pull step written in the file, whatever GPTFLOW_HOME the deploying shell had.
- The pull step, through Prefect's step runner, enters GPTFLOW_HOME or the checkout, and
  refuses a folder that is no checkout with the fix.
- ``gptflow-judge`` against a loopback Ollama stand-in: judgments written, a second run
  sends nothing; an unreachable judge gives a Skipped stage (required false) or a failed
  flow run (required true), with the fix recorded.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from _paths import REPO
from helpers_catalog import start_run
from helpers_fork import ForkServer

pytestmark = pytest.mark.prefect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_YAML = REPO / "prefect.yaml"


def _cli_env(server: dict) -> dict[str, str]:
    """The environment of the ``prefect`` commands (read when Prefect is imported)."""
    return {
        **os.environ,
        "PREFECT_API_URL": server["url"],
        "PREFECT_HOME": str(server["home"]),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
    }


#: ``prefect ARGS…`` in the checkout, as the console script runs it.
_PREFECT = (
    f"import os, sys; os.chdir({str(REPO)!r}); from prefect.cli import app; "
    "sys.argv[0] = 'prefect'; sys.exit(app())"
)


def _cli(
    children: ForkServer,
    args: list[str],
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> str:
    """``prefect ARGS…`` as a process of its own, forked by ``children`` (a fork server
    that imported Prefect once: ~1.2 CPU-s less per command); its stdout."""
    name = f"prefect-{len(children.codes)}"
    children.start(name, ["-c", _PREFECT, *args], env=env)
    code, out, err = children.finish(name, timeout)
    assert code == 0, f"prefect {' '.join(args)} failed:\n{out}\n{err}"
    return out


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
    assert step == {"flows.deployment.enter_checkout": {}}
    assert "{{" not in json.dumps(spec)  # nothing for `prefect deploy` to fill in
    deps = {d["name"]: d for d in spec["deployments"]}
    expected_flow = {
        "nightly": "gptflow-pipeline",
        "smoke": "gptflow-pipeline",
        "judge-rescore": "gptflow-judge",
    }
    # the stage deployments (docs/deployments.md, "Stages on work pools"): one per pool, named after it
    stage_deps = {n: d for n, d in deps.items() if d["entrypoint"].startswith("flows/stage_flow")}
    assert set(stage_deps) == {"gpu", "judge"}
    for name, dep in stage_deps.items():
        assert dep["work_pool"]["name"] == name and not dep.get("parameters")
        expected_flow[name] = "gptflow-stage"
    assert set(deps) == set(expected_flow)
    for name, dep in deps.items():
        if name not in stage_deps:
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


def _run_pull_steps() -> Path:
    """Run the file's pull steps; the folder they changed into (checked against the
    ``directory`` output Prefect passes on)."""
    import asyncio

    from prefect.deployments.steps.core import run_steps

    before = os.getcwd()
    try:
        out = asyncio.run(run_steps(_spec()["pull"], print_function=lambda *a: None))
        cwd = Path.cwd()
    finally:
        os.chdir(before)
    assert Path(out["directory"]) == cwd
    return cwd


def test_pull_step_enters_the_checkout(prefect_server, tmp_path, monkeypatch):
    """Prefect's own step runner, as a flow-run process uses it: GPTFLOW_HOME from the
    worker's environment wins; without it, the checkout gptflow is imported from; a folder
    that is no checkout is refused with the fix (not a ScriptError about /tmp/…)."""
    from prefect.deployments.steps.core import StepExecutionError

    other = tmp_path / "clone"
    (other / "flows").mkdir(parents=True)
    (other / "flows" / "pipeline.py").write_text("")
    monkeypatch.setenv("GPTFLOW_HOME", str(other))
    monkeypatch.chdir(tmp_path)
    assert _run_pull_steps() == other.resolve()

    monkeypatch.delenv("GPTFLOW_HOME")
    assert _run_pull_steps() == REPO

    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "nothing"))
    with pytest.raises(StepExecutionError) as err:
        _run_pull_steps()
    msg = str(err.value.__cause__ or err.value)
    assert "is not a gptflow checkout" in msg and 'export GPTFLOW_HOME="$PWD"' in msg, msg


def test_prefect_deploy_accepts_the_file(prefect_server, tmp_path: Path):
    from prefect.client.orchestration import get_client

    # The deployment guide's commands; creating the pool again (after editing prefect.yaml) must
    # succeed. Deployed from a shell whose GPTFLOW_HOME is set: what is stored must not
    # depend on it.
    env = _cli_env(prefect_server)
    with ForkServer(env, tmp_path / "cli", preload=("prefect",)) as children:
        for _ in range(2):
            for pool in ("gptflow", "gpu", "judge"):
                _cli(children, ["work-pool", "create", pool, "--type", "process", "--overwrite"])
        out = _cli(
            children,
            ["--no-prompt", "deploy", "--all"],
            timeout=300,
            env={**env, "GPTFLOW_HOME": "/somewhere/the/deploying/shell/was"},
        )
    for name in (
        "gptflow-pipeline/nightly",
        "gptflow-pipeline/smoke",
        "gptflow-judge/judge-rescore",
        "gptflow-stage/gpu",
        "gptflow-stage/judge",
    ):
        assert name in out, out

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
    assert nightly.pull_steps == [{"flows.deployment.enter_checkout": {}}]
    smoke = deps["gptflow-pipeline/smoke"]
    assert smoke.parameters == {"profile": "smoke"}
    assert smoke.schedules == []
    judge = deps["gptflow-judge/judge-rescore"]
    assert judge.entrypoint == "flows/judge_flow.py:gptflow_judge"
    assert judge.parameters == {"profile": "cpu", "required": True}
    assert [s.schedule.cron for s in judge.schedules] == ["0 5 * * 0"]
    with get_client(sync_client=True) as client:
        gpu = client.read_deployment_by_name("gptflow-stage/gpu")
    assert gpu.entrypoint == "flows/stage_flow.py:gptflow_stage" and gpu.work_pool_name == "gpu"
    assert gpu.pull_steps == [{"flows.deployment.enter_checkout": {}}]
    assert set(judge.parameter_openapi_schema["properties"]) == {
        "responses_run",
        "profile",
        "overrides",
        "required",
        "force",
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

    from prefect.client.orchestration import get_client

    from benchmarks.ollama_stub import OllamaStub
    from flows.judge_flow import gptflow_judge
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.migrate()
    start_run(cat, "r0", profile="smoke")
    cat.replace_rows("responses", _responses("r0", 2), where={"run_id": "r0"})
    start_run(cat, "r1", profile="smoke")  # started after r0: the latest
    cat.replace_rows("responses", _responses("r1", 3), where={"run_id": "r1"})

    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 77").start()
    try:
        overrides = [f"judge.hosts={stub.host}", "judge.retries=0"]
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

        # a second run: the same responses and judge settings are a cache hit: nothing
        # is sent, the result is the first run's
        state2 = gptflow_judge(
            responses_run="r1", profile="smoke", overrides=overrides, return_state=True
        )
        assert state2.is_completed(), state2.message
        res2 = state2.result()
        assert res2["cache_hit"] and res2["status"] == "cached" and res2["n_sent"] == 3
        assert stub.chat_count == 3
        row2 = _stage(str(state2.state_details.flow_run_id))
        assert row2["status"] == "cached" and row2["cache_hit"]
        assert json.loads(row2["outputs"])["producer_run_id"] == run1
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
    overrides = [f"judge.hosts={dead}", "judge.retries=0", "judge.timeout_s=3"]

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
