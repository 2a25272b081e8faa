"""Run states that tell the truth: every run ends completed, failed or crashed with the
reason; a run whose process died shows as crashed (``gptflow runs``, after ``gptflow
catalog rebuild``, and recorded by the next run); a run whose starter (the worker) died
stops saying so instead of failing with a broken pipe."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _paths import REPO

from flows.cli import main
from gpt.errors import CatalogLockedError
from tasks.catalog import Catalog
from tasks.records import run_state
from tasks.records.runs import RunRecorder


def _recorder() -> RunRecorder:
    from gpt.paths import artifacts_root
    from tasks.store.roots import root_child

    return RunRecorder(Catalog(), root_child(artifacts_root(), "runs"))


def _record(run_id: str) -> dict:
    from gpt.paths import artifacts_root

    return json.loads((Path(artifacts_root()) / "runs" / f"{run_id}.json").read_text())["run"]


def _status(run_id: str) -> tuple[str, str | None]:
    df = Catalog().query_df("SELECT status, message FROM runs WHERE run_id = ?", [run_id])
    return str(df.status[0]), df.message[0]


# A flow process: records its run as running, says so, then works until killed.
_RUNNER = textwrap.dedent(
    """
    import sys, time
    from tasks.store.roots import root_child
    from tasks.catalog import Catalog
    from tasks.records.runs import RunRecorder, StageRecord
    from gpt.paths import artifacts_root
    rec = RunRecorder(Catalog(), root_child(artifacts_root(), "runs"))
    with rec.running(sys.argv[1], flow_run_id=None, profile="smoke", config=None, git_rev=None):
        print("running", flush=True)
        time.sleep(600)
    """
)


def _start_runner(run_id: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, run_id],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
    return proc


def test_a_killed_run_shows_crashed_in_runs_after_rebuild_and_to_the_next_run(capsys):
    proc = _start_runner("killed-run")
    assert _status("killed-run") == ("running", None)
    assert main(["runs"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("killed-run"))
    assert "running" in line, line  # alive: running
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("killed-run "))
    assert "crashed" in line and "running" not in line, line
    assert f"killed-run: run crashed: its process (PID {proc.pid} on " in out, out
    assert main(["runs", "killed-run"]) == 0
    assert "run killed-run crashed: its process" in capsys.readouterr().out

    # a rebuilt catalog says crashed too (the record file still says running)
    assert _record("killed-run")["status"] == "running"
    assert main(["catalog", "rebuild", "--replace"]) == 0
    capsys.readouterr()
    status, message = _status("killed-run")
    assert status == "crashed" and f"PID {proc.pid}" in message, message

    # the next run records it crashed, in the catalog and in its record
    Catalog().upsert_rows("runs", [{"run_id": "killed-run", "status": "running"}], ["run_id"])
    rec = _recorder()
    with rec.running("next-run", flow_run_id=None, profile="smoke", config=None, git_rev=None):
        pass
    assert _record("killed-run")["status"] == "crashed"
    assert _status("killed-run")[0] == "crashed"
    assert _status("next-run") == ("completed", None)


def test_liveness_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, 0)
    here = run_state.this_host()
    me = {"status": "running", "host": here, "pid": os.getpid()}
    fresh = now - dt.timedelta(seconds=30)
    old = now - dt.timedelta(seconds=run_state.STALE_AFTER + 1)
    real_start = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # after this process began
    assert (
        run_state.dead_reason({**me, "heartbeat_at": fresh, "started_at": real_start}, now) is None
    )
    # a stale heartbeat: crashed when it ran elsewhere; here the process itself tells
    gone = run_state.dead_reason({**me, "host": "elsewhere", "heartbeat_at": old}, now)
    assert gone is not None and "no heartbeat since" in gone and "on elsewhere" in gone
    assert run_state.dead_reason({**me, "heartbeat_at": old, "started_at": real_start}, now) is None
    # an older record without a heartbeat: its start counts
    assert run_state.dead_reason({"status": "running", "started_at": old}, now) is not None
    # this host, a PID that is gone or that a later process reuses
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reason = run_state.dead_reason({**me, "pid": dead.pid, "heartbeat_at": fresh}, now)
    assert reason is not None and f"PID {dead.pid} on {here}" in reason
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=3650)
    assert run_state.dead_reason({**me, "started_at": later, "heartbeat_at": fresh}, now)
    # ended runs are left alone
    assert run_state.dead_reason({"status": "failed", "heartbeat_at": old}, now) is None
    settled = run_state.settle_run({**me, "pid": dead.pid, "heartbeat_at": fresh}, now)
    assert settled["status"] == "crashed" and settled["ended_at"] == fresh


def test_every_failure_ends_the_run_with_its_reason() -> None:
    rec = _recorder()
    with (
        pytest.raises(ValueError),
        rec.running("boom", flow_run_id=None, profile="smoke", config=None, git_rev=None),
    ):
        raise ValueError("bad thing\nsecond line")
    assert _status("boom") == ("failed", "ValueError: bad thing second line")
    assert _record("boom")["status"] == "failed"
    with (
        pytest.raises(KeyboardInterrupt),
        rec.running("stopped", flow_run_id=None, profile="smoke", config=None, git_rev=None),
    ):
        raise KeyboardInterrupt
    status, message = _status("stopped")
    assert status == "crashed" and "stopped" in message


def test_a_locked_catalog_at_the_start_ends_the_record_failed_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cat = Catalog()
    cat.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb,sys,time; c=duckdb.connect(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(cat.live_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("GPTFLOW_DB_LOCK_TIMEOUT", "0.5")
        with (
            pytest.raises(CatalogLockedError),
            _recorder().running(
                "locked-out", flow_run_id=None, profile="smoke", config=None, git_rev=None
            ),
        ):
            pytest.fail("the run must not start")
    finally:
        holder.kill()
        holder.wait()
    run = _record("locked-out")
    assert run["status"] == "failed", run
    assert "CatalogLockedError" in run["message"] and f"PID {holder.pid}" in run["message"]
    # the catalog never had the run: a rebuild brings it in, failed, with the reason
    assert main(["catalog", "rebuild", "--replace"]) == 0
    status, message = _status("locked-out")
    assert status == "failed" and "locked by another process" in message


# A worker: starts a flow process whose output it reads, then is killed. The flow process
# keeps printing (a progress bar) and reaches a metrics callback now and then.
_WORKER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(child.pid, flush=True)
    while True:
        line = child.stdout.readline()
        if not line:
            break
    """
)
_FLOW = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tasks.store.roots import root_child
    from tasks.catalog import Catalog
    from tasks.records.runs import RunRecorder, StageRecord
    from tasks.records.run_state import check_alive
    from gpt.paths import artifacts_root
    run_id, out = sys.argv[1], Path(sys.argv[2])
    rec = RunRecorder(Catalog(), root_child(artifacts_root(), "runs"))
    try:
        with rec.running(run_id, flow_run_id=None, profile="smoke", config=None, git_rev=None):
            rec.record(StageRecord(run_id, "pretrain", "running"))
            out.with_suffix(".started").touch()
            for step in range(10000):
                print(f"step {step}", flush=True)  # the progress bar
                sys.stderr.write(".")
                sys.stderr.flush()
                if step % 5 == 0:
                    check_alive()  # what the metrics sink does
                time.sleep(0.02)
    except BaseException as exc:
        out.write_text(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        raise
    """
)


def test_a_dead_worker_stops_the_run_saying_so(tmp_path: Path) -> None:
    out = tmp_path / "flow.json"
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, _FLOW, "orphan", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    flow_pid = int(worker.stdout.readline())
    deadline = time.monotonic() + 120
    while not out.with_suffix(".started").exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    while not out.exists():  # the flow process stops by itself
        assert time.monotonic() < deadline, "the flow process did not stop"
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while run_state.process_alive(flow_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    got = json.loads(out.read_text())
    assert got["error"] == "WorkerDiedError", got
    assert f"(PID {worker.pid})" in got["message"] and "died" in got["message"]
    run = _record("orphan")
    assert run["status"] == "crashed" and f"PID {worker.pid}" in run["message"], run
    status, message = _status("orphan")
    assert status == "crashed" and "died while the run went on" in message


# ---------------------------------------------------------------------- through the flow
def _flow_record(run_id: str) -> tuple[str, str]:
    run = _record(run_id)
    return run["status"], run["message"]


@pytest.mark.prefect
def test_runs_that_fail_before_their_first_stage_end_failed_with_the_reason(
    prefect_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import gptflow_pipeline, run_pipeline

    # the judge is required and unreachable: checked before any compute
    res = run_pipeline("smoke", ["judge.required=true", "judge.hosts=http://127.0.0.1:9"])
    assert res["status"] == "failed"
    status, message = _flow_record(res["run_id"])
    assert status == "failed" and "127.0.0.1:9" in message, message
    assert _status(res["run_id"]) == (status, message)
    # a stage placed on a work pool the server does not know
    res = run_pipeline("smoke", ["placement.pretrain=nosuchpool"])
    assert res["status"] == "failed"
    status, message = _flow_record(res["run_id"])
    assert status == "failed" and "PlacementError" in message and "nosuchpool" in message
    # settings that fail once the flow run started (a deployment run's parameters)
    state = gptflow_pipeline(profile="smoke", overrides=["pretrain.epochs=-3"], return_state=True)
    assert state.is_failed()
    status, message = _flow_record(str(state.state_details.flow_run_id))
    assert status == "failed" and "ConfigError" in message and "pretrain.epochs" in message
    assert _status(str(state.state_details.flow_run_id)) == (status, message)

    # the catalog is locked by another writer when the run starts
    cat = Catalog()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb,sys,time; c=duckdb.connect(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(120)", str(cat.live_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("GPTFLOW_DB_LOCK_TIMEOUT", "1")
        res = run_pipeline("smoke", [])
    finally:
        holder.kill()
        holder.wait()
    assert res["status"] == "failed" and "locked by another process" in res["error"], res
    status, message = _flow_record(res["run_id"])
    assert status == "failed" and f"PID {holder.pid}" in message, message
    # once the lock is gone, the next run brings the catalog in line with the record
    monkeypatch.setenv("GPTFLOW_DB_LOCK_TIMEOUT", "30")
    assert Catalog().query_df("SELECT * FROM runs WHERE run_id = ?", [res["run_id"]]).empty
    assert res["run_id"] in _recorder().reap()
    assert _status(res["run_id"]) == (status, message)


_CLI_RUN = textwrap.dedent(
    """
    import sys
    from flows.pipeline import run_pipeline
    run_pipeline("smoke", ["pretrain.epochs=60", f"download.mirror={sys.argv[1]}"], progress=False)
    """
)


@pytest.mark.prefect
@pytest.mark.slow
def test_a_killed_cli_run_is_set_crashed_in_prefect_by_the_next_run(prefect_server, mirror):
    """`gptflow run` (the flow in the CLI's own process) killed -9: nobody tells Prefect,
    which shows the flow run Running; the next run records it crashed and sets it so."""
    from prefect.client.orchestration import get_client

    from flows.pipeline import run_pipeline
    from gpt.paths import artifacts_root

    env = dict(os.environ, PREFECT_API_URL=prefect_server["url"])
    proc = subprocess.Popen([sys.executable, "-c", _CLI_RUN, str(mirror)], cwd=REPO, env=env)
    runs = Path(artifacts_root()) / "runs"
    deadline = time.monotonic() + 300
    run_id = None
    while run_id is None:
        assert time.monotonic() < deadline and proc.poll() is None, "pretrain never started"
        for path in runs.glob("*.json") if runs.is_dir() else []:
            rec = json.loads(path.read_text())
            if (rec.get("stages", {}).get("pretrain") or {}).get("status") == "running":
                run_id = path.stem
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_running()
    res = run_pipeline("smoke", ["judge.required=true", "judge.hosts=http://127.0.0.1:9"])
    assert res["status"] == "failed"
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.is_crashed() and f"PID {proc.pid}" in (state.message or ""), state
    assert _status(run_id)[0] == "crashed"
