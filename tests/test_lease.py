"""One computation per stage key at a time (observation 8 of issue 11).

Unit tests of the lease (:mod:`tasks.lease`), then two smoke pipeline runs of one
config started at the same moment in two processes: both complete, and every stage is
computed by exactly one of them (the other waits for the lease and takes the hit).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.lease import Lease


def test_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "k.lease"
    first = Lease(path, "run-a", ttl_s=5, poll_s=0.05)
    assert first.acquire() is False  # free: taken at once
    order: list[str] = []

    def second() -> None:
        lease = Lease(path, "run-b", ttl_s=5, poll_s=0.05)
        waited = lease.acquire(on_wait=lambda info: order.append(f"waiting for {info.run_id}"))
        order.append(f"b got it (waited={waited})")
        lease.release()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    order.append("a releases")
    first.release()
    t.join(timeout=10)
    assert order == ["waiting for run-a", "a releases", "b got it (waited=True)"]
    assert not path.exists()


def test_renewals_keep_a_long_computation_owned(tmp_path: Path) -> None:
    path = tmp_path / "k.lease"
    owner = Lease(path, "run-a", ttl_s=0.6, poll_s=0.05)
    owner.acquire()
    time.sleep(1.5)  # longer than the TTL: the heartbeat renewed it
    other = Lease(path, "run-b", ttl_s=0.6, poll_s=0.05)
    with pytest.raises(TimeoutError):
        other.acquire(timeout_s=0.5)
    owner.release()
    other.acquire(timeout_s=2)  # free now: taken without waiting
    assert other.read().run_id == "run-b"
    other.release()


def test_a_dead_owners_lease_is_broken(tmp_path: Path) -> None:
    """A killed run (its pid gone on this host) does not block the key."""
    path = tmp_path / "k.lease"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(proc.stdout)
    now = time.time()
    path.write_text(json.dumps({
        "token": "t", "run_id": "killed", "host": socket.gethostname(), "pid": dead_pid,
        "acquired_at": now, "renewed_at": now, "ttl_s": 3600,
    }))  # fmt: skip
    lease = Lease(path, "run-b", poll_s=0.05)
    assert lease.acquire(timeout_s=5) is False
    assert lease.read().run_id == "run-b"
    lease.release()


def test_an_expired_lease_of_another_machine_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "k.lease"
    old = time.time() - 120
    path.write_text(json.dumps({
        "token": "t", "run_id": "lost", "host": "another-host", "pid": 1,
        "acquired_at": old, "renewed_at": old, "ttl_s": 60,
    }))  # fmt: skip
    lease = Lease(path, "run-b", poll_s=0.05)
    assert lease.acquire(timeout_s=5) is False
    lease.release()


_RUN = r"""
import json, sys
from flows.pipeline import run_pipeline
res = run_pipeline("smoke", ["judge.hosts=" + sys.argv[1]], progress=False)
print("RESULT " + json.dumps({"status": res["status"], "run_id": res["run_id"],
                               "stages": res["stages"]}))
"""


@pytest.mark.slow
@pytest.mark.prefect
def test_two_runs_of_one_config_at_once_compute_each_stage_once(
    prefect_server, mirror: Path, tmp_path: Path
) -> None:
    from benchmarks.ollama_stub import OllamaStub

    env = {
        **os.environ,
        "GPTFLOW_DB": str(tmp_path / "catalog.duckdb"),
        "GPTFLOW_ARTIFACTS": str(tmp_path / "artifacts"),
        "GPTFLOW_DATASETS": str(tmp_path / "datasets"),
        "GPTFLOW_MIRROR": str(mirror),
        "PREFECT_API_URL": prefect_server["url"],
        "GPTFLOW_LEASE_POLL_S": "0.2",
    }
    with OllamaStub(models=["llama3"], reply=lambda req: {"score": 60}) as stub:
        procs = [
            subprocess.Popen([sys.executable, "-c", _RUN, stub.host], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]  # fmt: skip
        outs = [p.communicate(timeout=900) for p in procs]
        chats = stub.chat_count
    results = []
    for (out, err), proc in zip(outs, procs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    assert [r["status"] for r in results] == ["completed", "completed"], results
    for stage in results[0]["stages"]:
        if stage == "download":  # not a cached stage: both verify the same files
            continue
        computed = [not r["stages"][stage]["cache_hit"] for r in results]
        assert computed.count(True) == 1, (stage, [r["stages"][stage] for r in results])
    assert chats == 12  # the judge scored the 12 test responses once
    leases = list((tmp_path / "artifacts" / "stages").glob("*/*.lease"))
    assert leases == [], leases  # every lease released
