"""Leases: one computation per stage key, one writer per downloaded file (:mod:`tasks.store.lease`).

Unit tests of the file lease, then the two ways a lease could be stolen silently — a
renewal that writes over the lease a breaker took, and a stalled owner (``SIGSTOP``)
that commits its stage folder after its lease was broken — then per-file leases of the
downloader (two ``gptflow download`` processes at once through a slow mirror), and two
smoke pipeline runs of one config started at the same moment in two processes: both
complete, and every stage is computed by exactly one of them.

Tests synchronise on events, pipes and the lease files themselves, never on a fixed
sleep: :func:`_until` waits (bounded) for a condition.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_fork import ForkServer
from helpers_http import Fault, serve

from tasks.store.folder import StageStore
from tasks.store.lease import Lease, LeaseLost


def _until(cond: Callable[[], object], timeout: float = 20.0) -> None:
    """Return as soon as ``cond()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.01)


def test_second_holder_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "k.lease"
    first = Lease(path, "run-a", ttl_s=5, poll_s=0.05)
    assert first.acquire() is False  # free: taken at once
    order: list[str] = []
    waiting = threading.Event()

    def on_wait(info) -> None:
        order.append(f"waiting for {info.run_id}")
        waiting.set()

    def second() -> None:
        lease = Lease(path, "run-b", ttl_s=5, poll_s=0.05)
        waited = lease.acquire(on_wait=on_wait)
        order.append(f"b got it (waited={waited})")
        lease.release()

    t = threading.Thread(target=second)
    t.start()
    assert waiting.wait(20)
    order.append("a releases")
    first.release()
    t.join(timeout=20)
    assert order == ["waiting for run-a", "a releases", "b got it (waited=True)"]
    assert not path.exists()


def test_renewals_keep_a_long_computation_owned(tmp_path: Path) -> None:
    path = tmp_path / "k.lease"
    owner = Lease(path, "run-a", ttl_s=0.6, poll_s=0.05)
    owner.acquire()
    acquired = owner.read().acquired_at
    _until(lambda: owner.read().renewed_at > acquired + 0.6)  # renewed past one TTL
    other = Lease(path, "run-b", ttl_s=0.6, poll_s=0.05)
    with pytest.raises(TimeoutError):
        other.acquire(timeout_s=0.5)
    owner.confirm()
    owner.release()
    assert other.acquire(timeout_s=2) is False  # free now: taken without waiting
    assert other.read().run_id == "run-b"
    other.release()


def test_a_dead_owners_lease_is_broken(tmp_path: Path) -> None:
    """A killed run (its pid gone on this host) does not block the key; the breaker
    looks for that run's result first (it may have committed before it died)."""
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
    assert lease.acquire(timeout_s=5) is True
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
    assert lease.acquire(timeout_s=5) is True
    assert lease.read().run_id == "run-b"
    lease.release()


def test_an_unreadable_lease_is_broken_after_its_ttl(tmp_path: Path) -> None:
    """A lease file left half-written (its machine crashed while creating it) is judged
    by its age: it blocks for one TTL, not forever."""
    path = tmp_path / "k.lease"
    path.write_text('{"token": "t", "run_id')
    lease = Lease(path, "run-b", ttl_s=0.5, poll_s=0.05)
    assert lease.acquire(timeout_s=10) is True
    assert lease.read().run_id == "run-b"
    lease.release()


def test_a_stalled_renewal_never_overwrites_the_lease_a_breaker_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's heartbeat stalls in the middle of a renewal (after it last looked at
    its lease); meanwhile the lease goes stale and a breaker takes it. When the renewal
    goes on, the breaker's lease is untouched and the owner knows it lost."""
    path = tmp_path / "k.lease"
    owner = Lease(path, "owner", ttl_s=0.4, poll_s=0.02)
    stalled, resume = threading.Event(), threading.Event()
    real_time = time.time

    def clock() -> float:  # a renewal stamps the time: stall the owner's beat there
        if threading.current_thread() is owner._thread and not stalled.is_set():
            stalled.set()
            resume.wait(30)
        return real_time()

    owner.acquire()
    monkeypatch.setattr(time, "time", clock)
    assert stalled.wait(20)
    breaker = Lease(path, "breaker", ttl_s=5, poll_s=0.02)
    try:
        assert breaker.acquire(timeout_s=20) is True  # waited out the TTL, then broke it
        resume.set()
        _until(lambda: breaker.read().token != breaker.token or owner.lost)
        assert breaker.read().token == breaker.token  # not written over
        assert owner.lost
        with pytest.raises(LeaseLost, match="must not publish"):
            owner.confirm()
        owner.release()  # releases nothing that is not its own
        assert breaker.read().token == breaker.token
        breaker.confirm()
    finally:
        resume.set()
        breaker.release()
    assert not path.exists()


# --------------------------------------------------------------------------- commits
_OWNER = r"""
import sys
from tasks.store.roots import open_stage_store
store = open_stage_store(sys.argv[1])
lease = store.lease("s", "k", "owner")
lease.acquire()
work = store.fresh_work_dir("s", "k", lease, resume=True)
(work / "result.txt").write_text("owner")
print("READY", flush=True)
sys.stdin.readline()  # the test says when to commit
try:
    store.commit("s", "k", {"producer_run_id": "owner", "out": {}}, lease)
    print("COMMITTED", flush=True)
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc, flush=True)
lease.release()
"""


def _artifacts_root(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> str:
    """A fresh artifacts root: a local folder, or an ``s3://`` prefix on the session's
    moto endpoint (work folders in a local cache under ``tmp_path``)."""
    if backend == "file":
        return str(tmp_path / "artifacts")
    s3 = request.getfixturevalue("s3_server")
    for name, value in (("ENDPOINT", s3.endpoint), ("KEY_ID", s3.key_id),
                        ("SECRET", s3.secret), ("REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(f"GPTFLOW_ARTIFACTS_S3_{name}", value)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    return f"s3://{s3.bucket}/lease-{tmp_path.name}"


@pytest.mark.parametrize("backend", ["file", "s3"])
@pytest.mark.parametrize("breaker_commits", ["before the owner wakes", "after the owner woke"])
def test_a_stopped_owner_never_commits_over_the_breaker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
    breaker_commits: str,
) -> None:
    """An owner process stopped (SIGSTOP) past its lease's TTL loses the lease to a
    breaker, which takes over its work folder; resumed (SIGCONT), the owner's commit is
    refused, and the breaker's result is the one published — whether the breaker
    committed before the owner woke or only after; for a local artifacts folder and an
    object store alike."""
    from tasks.store.roots import open_stage_store

    root = _artifacts_root(backend, tmp_path, monkeypatch, request)
    monkeypatch.setenv("GPTFLOW_LEASE_TTL_S", "1")
    monkeypatch.setenv("GPTFLOW_LEASE_POLL_S", "0.05")
    store = open_stage_store(root)
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            breaker = store.lease("s", "k", "breaker")
            assert breaker.acquire(timeout_s=30) is True  # waited out the TTL, then broke it
            work = store.fresh_work_dir("s", "k", breaker, resume=True)
            assert (work / "result.txt").read_text() == "owner"  # the attempt, taken over
            (work / "result.txt").write_text("breaker")
            if breaker_commits == "before the owner wakes":
                store.commit("s", "k", {"producer_run_id": "breaker", "out": {}}, breaker)
                breaker.release()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.strip().startswith("REFUSED LeaseLost"), (out, err[-2000:])
    if breaker_commits == "after the owner woke":
        assert (work / "result.txt").read_text() == "breaker"  # its folder left alone
        store.commit("s", "k", {"producer_run_id": "breaker", "out": {}}, breaker)
        breaker.release()
    final = store.final_dir("s", "k")
    assert (final / "result.txt").read_text() == "breaker"
    assert store.lookup("s", "k")[0]["producer_run_id"] == "breaker"
    assert sorted(p.name for p in store.root.joinpath("s").iterdir()) == ["k"]


def test_a_new_holder_resumes_the_earlier_attempt_and_clears_the_rest(tmp_path: Path) -> None:
    """Work folders are named by their holder's lease: the next holder takes over the
    latest earlier attempt (also one left by an older version, ``<key>.partial``) and
    removes the others; without resume it starts empty."""
    store = StageStore(tmp_path / "stages")
    legacy = store.root / "s" / "k.partial"
    legacy.mkdir(parents=True)
    (legacy / "step").write_text("1")
    first = store.lease("s", "k", "a")
    first.acquire()
    work = store.fresh_work_dir("s", "k", first, resume=True)
    assert work != legacy and (work / "step").read_text() == "1" and not legacy.exists()
    first.release()  # crashed: the folder stays
    second = store.lease("s", "k", "b")
    second.acquire()
    with pytest.raises(LeaseLost):  # the old holder cannot commit
        store.commit("s", "k", {"out": {}}, first)
    assert work.exists()
    again = store.fresh_work_dir("s", "k", second, resume=False)
    assert list(again.iterdir()) == [] and not work.exists()
    store.commit("s", "k", {"producer_run_id": "b", "out": {}}, second)
    second.release()
    assert sorted(p.name for p in store.root.joinpath("s").iterdir()) == ["k"]


# --------------------------------------------------------------------------- downloads
_DOWNLOAD = r"""
import sys
from gpt.data import sources
from gpt.data.sources import Source, SourceFile

# a GPT-2 weight file without a published sha256 (trust on first use)
sources.SOURCES["gpt2-test"] = Source("gpt2-test", "test weights", (
    SourceFile("gpt2/355M/model.ckpt.index", ("https://invalid.example/x",)),))
from flows.cli import main
print("READY", flush=True)
sys.stdin.readline()  # start together
sys.exit(main(sys.argv[1:]))
"""


def test_two_downloads_of_one_file_at_once_end_with_one_verified_file(
    tmp_path: Path, mirror: Path
) -> None:
    """Two ``gptflow download`` processes fetch the same files at once through a slow
    mirror: each file is fetched once (the other process waits on its lease, then finds
    it verified), both succeed, and the files hold the mirror's bytes."""
    www = tmp_path / "www"
    (www / "gpt2" / "355M").mkdir(parents=True)
    shutil.copy(mirror / "the-verdict.txt", www / "the-verdict.txt")
    weights = os.urandom(32 * 1024)
    (www / "gpt2" / "355M" / "model.ckpt.index").write_bytes(weights)
    dest = tmp_path / "datasets"
    paths = ["/m/the-verdict.txt", "/m/gpt2/355M/model.ckpt.index"]
    with serve(www) as server:
        for p in paths:
            server.set_fault(p, Fault(throttle=0.1))  # ~1 s per file
        args = ["--only", "the-verdict", "--only", "gpt2-test", "--mirror", server.url("/m"),
                "--dest", str(dest), "--no-progress"]  # fmt: skip
        env = {**os.environ, "GPTFLOW_LEASE_POLL_S": "0.1"}
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _DOWNLOAD, "download", *args, "--db", str(db)],
                text=True,
                env=env,
                **pipes,
            )
            for db in (tmp_path / "catalog0.duckdb", tmp_path / "catalog1.duckdb")
        ]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        for proc in procs:  # both imported and waiting: go
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=120) for proc in procs]
        gets = {p: [(r.status, r.range) for r in server.requests_for(p)] for p in paths}
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert gets == {p: [(200, None)] for p in paths}  # one whole transfer per file
    text = "".join(out for out, _ in outs)
    assert text.count("fetched") == 2 and text.count("skipped (verified)") == 2, text
    assert (dest / "the-verdict.txt").read_bytes() == (www / "the-verdict.txt").read_bytes()
    assert (dest / "gpt2" / "355M" / "model.ckpt.index").read_bytes() == weights
    left = [p.name for p in dest.rglob("*") if p.name.endswith((".part", ".lease"))]
    assert left == []


# --------------------------------------------------------------------------- pipeline
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
    with (
        OllamaStub(models=["llama3"], reply=lambda req: {"score": 60}) as stub,
        ForkServer(env, tmp_path / "logs") as children,
    ):
        for name in ("a", "b"):
            children.start(name, ["-c", _RUN, stub.host])
        outs = [children.finish(name, timeout=900) for name in ("a", "b")]
        chats = stub.chat_count
    results = []
    for code, out, err in outs:
        assert code == 0, err[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    assert [r["status"] for r in results] == ["completed", "completed"], results
    for stage in results[0]["stages"]:
        if stage == "download":  # not a cached stage: both verify the same files
            continue
        computed = [not r["stages"][stage]["cache_hit"] for r in results]
        assert computed.count(True) == 1, (stage, [r["stages"][stage] for r in results])
    assert chats == 12  # the judge scored the 12 test responses once
    stages = tmp_path / "artifacts" / "stages"
    leases = list(stages.glob("*/*.lease")) + list((tmp_path / "datasets").rglob("*.lease"))
    assert leases == [], leases  # every lease released
    assert list(stages.glob("*/*.partial")) == []  # every work folder committed
