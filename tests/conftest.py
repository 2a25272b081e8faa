"""Shared fixtures, the suite's thread setting and the order test files run in.

Where a new test file goes: ``tests/README.md`` (``tests/gpt/`` the library,
``tests/tasks/`` stages, store and catalog, ``tests/flows/`` commands, config, report,
server and deployments, ``tests/pipeline/`` whole-DAG runs through Prefect,
``tests/reliability/`` injected faults).

``mirror`` is a folder laid out like the download mirror (datasets at the top, GPT-2
tokenizer files under ``gpt2/``): ``GPTFLOW_TEST_MIRROR``, else ``../shared/data`` beside
the checkout, else the real inputs fetched once into a cache folder. Whatever is found is
verified with the project's own downloader (every pinned sha256). When the inputs are
missing or do not verify, the tests that need them fail with the reason under CI
(``CI=true``: a broken downloader or a checksum mismatch must not pass as skips) and are
skipped with the reason elsewhere (e.g. a laptop offline).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _ci import in_ci, unavailable
from _paths import REPO
from prefect.logging.configuration import ensure_logging_setup

from gpt import heap

# Prefect binds its console log handler to sys.stderr when it sets up logging (on first
# use). Set up here, that is the session's stream; set up first inside a test that
# captures output (capsys), it would be that test's buffer, closed afterwards — and every
# later flow run's log line would fail, recursing through Prefect's print-as-log of the
# logging error.
ensure_logging_setup()

# One torch (OpenMP) thread in every test process and every child it starts (torchrun
# ranks, workers, servers inherit the environment). The suite runs several processes on
# few cores, and the tests' models are tiny: threads gain nothing there, and OpenMP
# threads spinning at barriers while their peers wait for a core burned 3-4x the CPU of
# the single-threaded run (tests/gpt/test_classifier.py + test_generate.py: 45 vs 10.5
# CPU-s). Set OMP_NUM_THREADS yourself to test with more.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if "torch" in sys.modules:  # imported before this file (a plugin): set it there too
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The glibc malloc settings every gptflow process trains under (gpt.heap: the `gptflow`
# command restarts itself with them, deployments set them); without them each training
# step maps and page-faults its large buffers afresh. glibc reads them when a process
# starts: this process keeps its own, the xdist workers (started after this file is read)
# and every child inherit them. test_settings_effects.py in one process started with
# them: 12.1-12.8 -> 7.1-8.0 kernel CPU-s, 32-33 -> 27-28 s.
os.environ.update(heap.tunables_env(os.environ) or {})


def _cost(item: pytest.Item) -> int:
    """How heavy a test's file is, from what its tests use: 2 with the Prefect server
    (whole pipeline runs, deployments, workers), 1 marked slow, else 0."""
    if "prefect_server" in getattr(item, "fixturenames", ()):
        return 2
    return 1 if item.get_closest_marker("slow") else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the heaviest test files first, each file's tests together and in their order.

    ``make test`` hands whole files to its worker processes in this order
    (``--dist loadfile --no-loadscope-reorder``): a long file started last would leave
    the other processes idle while it finishes (xdist's default order, by number of
    tests, put the pipeline files, which hold few tests, last)."""
    files: dict[str, int] = {}
    for item in items:
        path = str(item.path)
        files[path] = max(files.get(path, 0), _cost(item))
    items.sort(key=lambda item: -files[str(item.path)])  # stable: file order kept within


def _find_mirror() -> Path | None:
    env = os.environ.get("GPTFLOW_TEST_MIRROR")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data"
    if (shared / "the-verdict.txt").exists():
        return shared
    return None


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"test inputs unusable under CI: {reason}", pytrace=False)
    unavailable(reason)


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local mirror folder holding the real public inputs, verified."""
    from gpt.data.download import download_sources
    from gpt.data.sources import DATASET_SOURCES

    found = _find_mirror()
    if found is not None:
        try:  # the downloader verifies every pinned sha256 on the way
            download_sources(
                list(DATASET_SOURCES),
                dest=tmp_path_factory.mktemp("verified-inputs"),
                mirror=str(found),
                progress=False,
                retries=1,
            )
        except Exception as exc:
            _unavailable(f"the input mirror {found} does not verify: {exc}")
        return found
    cache = Path(os.environ.get("GPTFLOW_TEST_CACHE", Path.home() / ".cache" / "gptflow-inputs"))
    try:
        download_sources(list(DATASET_SOURCES), dest=cache, progress=False)
    except Exception as exc:  # offline or blocked: say why
        _unavailable(f"real inputs unavailable (no ../shared/data mirror; download failed: {exc})")
    return cache


@pytest.fixture(scope="session")
def tokenizer_dir(mirror: Path) -> Path:
    """Folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``."""
    return mirror / "gpt2"


@pytest.fixture
def release_mirror(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A mirror folder holding a GPT-2 1558M release (``gpt2/1558M/``) whose weight files,
    which have no published sha256 (trust on first use), are small stand-ins; the
    tokenizer files are the real ones."""
    mirror = tmp_path / "release-mirror"
    release = mirror / "gpt2" / "1558M"
    release.mkdir(parents=True)
    for name in ("checkpoint", "hparams.json", "model.ckpt.data-00000-of-00001",
                 "model.ckpt.index", "model.ckpt.meta"):  # fmt: skip
        (release / name).write_bytes(f"{name} v1".encode())
    for name in ("encoder.json", "vocab.bpe"):
        (release / name).symlink_to(tokenizer_dir / name)
    return mirror


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test writes its catalog, artifacts, downloads and cache under its own tmp
    folder, and leaves no catalog publish waiting for its gap: a publish timer a test
    left would fire inside the next test in the process (and count as its file open)."""
    monkeypatch.setenv("GPTFLOW_DB", str(tmp_path / "catalog.duckdb"))
    monkeypatch.setenv("GPTFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("GPTFLOW_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    for name in list(os.environ):  # never a shared catalog/store the developer configured
        if name.startswith(("GPTFLOW_CATALOG_", "GPTFLOW_ARTIFACTS_S3_")):
            monkeypatch.delenv(name)
    yield
    publish = sys.modules.get("tasks.catalog.publish")
    if publish is not None:
        publish.publish_deferred()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster for the session (``tests/_servers.py``); skipped
    when PostgreSQL is not installed, except under CI where that fails."""
    from _servers import postgres_server as start

    with start() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 endpoint with one bucket for the session (``tests/_servers.py``)."""
    from _servers import moto_s3_server

    with moto_s3_server() as server:
        yield server


def _reap_when_it_exits(pidfile: Path) -> None:
    """Wait for the server process (a child of this process) in a thread, so that it does
    not stay a zombie once stopped: ``stop_server`` polls ``kill(pid, 0)``, which a zombie
    answers, and waited its whole timeout (10 s per test process) at every session end."""
    pid = int(pidfile.read_text().strip())

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    threading.Thread(target=reap, name="reap-prefect-server", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _migrated_prefect_db(tmp_path_factory: pytest.TempPathFactory, home: Path) -> None:
    """Give ``home`` a migrated Prefect database and gptflow's marker saying so, when
    this is one of several xdist workers: the first worker migrates one database for the
    session (``prefect server database upgrade``, ~7 CPU-s), the others copy it. Alone,
    the server manager migrates as it always does."""
    import shutil
    import subprocess

    from filelock import FileLock

    from flows import server

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    shared = tmp_path_factory.getbasetemp().parent  # the session's, shared by its workers
    template = shared / "prefect-db-template"
    with FileLock(str(shared / "prefect-db-template.lock")):
        if not (template / ".db-migrated").exists():
            template.mkdir(exist_ok=True)
            env = {**os.environ, "PREFECT_HOME": str(template),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env, check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            (template / ".db-migrated").touch()
    for db in template.glob("prefect.db*"):
        shutil.copy2(db, home / db.name)
    server.server_paths().migrated_marker.touch()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One local Prefect server for the whole test session, started by gptflow's own
    manager with a temporary home and port; yields {"url", "home"}."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    from flows import server

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    old = {k: os.environ.get(k) for k in ("GPTFLOW_PREFECT_HOME", "GPTFLOW_PREFECT_PORT")}
    os.environ["GPTFLOW_PREFECT_HOME"] = str(home)
    os.environ["GPTFLOW_PREFECT_PORT"] = str(port)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _migrated_prefect_db(tmp_path_factory, home)
        server.start_server(url, wait_s=120)
        _reap_when_it_exits(server.server_paths().pidfile)
        with temporary_settings(
            updates={
                PREFECT_API_URL: url,
                PREFECT_HOME: str(home),
                PREFECT_SERVER_ANALYTICS_ENABLED: False,
            }
        ):
            yield {"url": url, "home": home}
    finally:
        # Send buffered logs/events while the server is still up: otherwise Prefect's
        # workers retry against a dead server when the interpreter exits.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=10)
        server.stop_server(timeout_s=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
