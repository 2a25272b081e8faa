"""glibc malloc tunables for training (gpt.heap): what the ``gptflow`` command and the
Prefect deployments start with, and that glibc really keeps freed memory with them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from _paths import REPO

import flows.cli as cli
from flows.deployment import read_prefect_yaml
from gpt import heap

glibc_only = pytest.mark.skipif(not heap.is_glibc(), reason="glibc malloc tunables")


@glibc_only
def test_tunables_env_adds_ours_and_keeps_the_users() -> None:
    added = heap.tunables_env({"PATH": "/bin"})
    assert added == {"PATH": "/bin", "GLIBC_TUNABLES": heap.MALLOC_TUNABLES}
    other = heap.tunables_env({"GLIBC_TUNABLES": "glibc.rtld.nns=2"})
    assert other is not None
    assert other["GLIBC_TUNABLES"] == f"glibc.rtld.nns=2:{heap.MALLOC_TUNABLES}"
    # a malloc tunable already set (the user's, or ours after the restart): left alone
    assert heap.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}) is None
    assert heap.tunables_env(added) is None


def test_tunables_env_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "is_glibc", lambda: False)
    assert heap.tunables_env({}) is None
    assert heap.release_free_memory() in (True, False)


@glibc_only
@pytest.mark.parametrize(
    ("argv", "restarts"),
    [(["run", "--profile", "smoke"], True), (["-v", "bench", "--quick"], True), (["sql"], False)],
)
def test_training_commands_restart_with_the_tunables(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], restarts: bool
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    cli.restart_with_malloc_tunables(argv)
    if not restarts:
        assert calls == []
        return
    [(path, args, env)] = calls
    assert path == sys.executable and args == sys.orig_argv
    assert env["GLIBC_TUNABLES"] == heap.MALLOC_TUNABLES
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", heap.MALLOC_TUNABLES)  # the restarted process
    cli.restart_with_malloc_tunables(argv)
    assert calls == []


def test_deployments_start_flow_runs_with_the_tunables() -> None:
    deployments = read_prefect_yaml(REPO)["deployments"]
    assert deployments
    for d in deployments:
        env = d["work_pool"]["job_variables"]["env"]
        assert env["GLIBC_TUNABLES"] == heap.MALLOC_TUNABLES, d["name"]


_FAULTS = textwrap.dedent(
    """
    import resource, threading
    def run():
        faults = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = bytearray(96 << 20)  # 96 MiB, zero-filled: every page touched
            del block
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(max(faults[1:]))
    t = threading.Thread(target=run)  # Prefect runs stages in worker threads
    t.start()
    t.join()
    """
)


def _faults_after_reuse(env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@glibc_only
def test_the_tunables_make_glibc_reuse_freed_blocks() -> None:
    """Allocating and freeing a 96 MiB block again and again in a worker thread: with
    glibc's defaults every round maps fresh pages (one fault per 4 KiB page); with
    MALLOC_TUNABLES the freed block is reused and touching it again faults no page."""
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    with_tunables = heap.tunables_env(base)
    assert with_tunables is not None
    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert _faults_after_reuse(base) > pages // 2
    assert _faults_after_reuse(with_tunables) < pages // 20


@glibc_only
def test_the_test_processes_train_with_the_tunables() -> None:
    """tests/conftest.py gives the suite's processes the tunables the product trains
    under (or keeps a developer's own ``glibc.malloc.*`` choice, as ``tunables_env``
    does): every child a test starts inherits them, and an xdist worker (started after
    conftest was read) started with them."""
    assert heap.tunables_env(os.environ) is None  # malloc tunables are set
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', ''))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "glibc.malloc." in out.stdout
    if os.environ.get("PYTEST_XDIST_WORKER"):
        with open(f"/proc/{os.getpid()}/environ", "rb") as f:  # as the process started
            assert b"glibc.malloc." in f.read()
