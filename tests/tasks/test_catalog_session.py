"""A run's catalog session: one write connection to the catalog file for the run's
operations, never holding DuckDB's lock from a process that waits, never inherited by a
fork, reads still read-only; stage events publishing at most once a gap; look-ups and
small writes binding no parameters (DuckDB imports pandas to bind one)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest
from _paths import REPO
from helpers_catalog import metric_rows, published_catalog

from gpt.errors import CatalogError
from tasks.catalog import Catalog, catalog_session
from tasks.catalog import connections as conns
from tasks.catalog import publish as publish_mod
from tasks.catalog.values import inline_params


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return published_catalog(tmp_path / "cat.duckdb", 2, lock_timeout=5)


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = duckdb.connect

    def counting(database: str = ":memory:", *args, **kwargs):
        opened.append(str(database))
        return real(database, *args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", counting)
    return opened


def _operations(cat: Catalog, run: str) -> None:
    other = Catalog(cat.path, lock_timeout=5)  # another handle, as every stage makes one
    cat.replace_rows("metrics", metric_rows(3, run), where={"run_id": run})
    assert len(cat.query_rows("SELECT * FROM metrics WHERE run_id = ?", [run])) == 3
    other.upsert_rows("runs", [{"run_id": run, "status": "running"}], key=["run_id"])
    assert other.query_df("SELECT status FROM runs WHERE run_id = ?", [run]).status[0] == "running"
    with cat.held(read_only=True):
        assert cat.query_rows("SELECT count(*) AS n FROM metrics")[0]["n"] >= 3
    cat.publish()
    other.insert_rows("metrics", metric_rows(1, run + "-more"))


def test_a_session_opens_the_catalog_file_once(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _count_opens(monkeypatch)
    _operations(cat, "plain")
    without = sum(p.endswith(".live") for p in opened)
    opened.clear()
    with catalog_session():
        _operations(cat, "session")
    assert sum(p.endswith(".live") for p in opened) == 1, opened
    assert without >= 7, opened  # outside a session every operation opens the file
    assert not conns._IDLE  # the session's end closed it
    snap = Catalog(cat.path, snapshot=True)
    assert snap.query_rows("SELECT count(*) AS n FROM metrics WHERE run_id LIKE 'session%'") == [
        {"n": 4}
    ]


def _try_open(path: Path) -> str:
    """Open ``path`` read-write in another process at once: 'opened' or 'locked'."""
    script = textwrap.dedent(
        f"""
        import duckdb
        try:
            duckdb.connect({str(path)!r}).close()
            print("opened")
        except duckdb.IOException as exc:
            print("locked" if "lock" in str(exc).lower() else exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    return out.stdout.strip() or out.stderr[-500:]


def test_the_pooled_connection_keeps_its_lock_after_a_publish(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing copies the live file through a descriptor of it; closing any descriptor
    drops every POSIX lock this process holds on the file — DuckDB's too — so another
    process could open the file the idle connection still has open (two writers: a
    corrupted catalog). The descriptor is closed only with the connection."""
    monkeypatch.setattr(conns, "IDLE_CLOSE_S", 60.0)
    with catalog_session():
        cat.insert_rows("metrics", metric_rows(1, "x"))
        assert cat.publish()
        assert conns._IDLE  # idle, still open
        assert _try_open(cat.live_path) == "locked"
    assert _try_open(cat.live_path) == "opened"


def test_a_process_waiting_for_the_file_gets_it_from_a_busy_session(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that never idles (an operation every 20 ms) still lets another process
    in: the waiter touches ``<live>.waiting`` and the holder closes after its operation."""
    monkeypatch.setattr(conns, "IDLE_CLOSE_S", 60.0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        with catalog_session():
            while not stop.is_set():
                try:
                    cat.query_rows("SELECT count(*) FROM metrics")
                except BaseException as exc:
                    errors.append(exc)
                    return
                time.sleep(0.02)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        time.sleep(0.3)
        script = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from tasks.catalog import Catalog
            Catalog({str(cat.path)!r}, lock_timeout=20).insert_rows(
                "metrics", [{{"run_id": "waiter", "value": 1.0}}])
            print("written")
            """
        )
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        waited = time.monotonic() - t0
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors, errors
    assert out.stdout.strip() == "written", out.stderr[-2000:]
    assert waited < 15, waited  # not the lock timeout (20 s)
    assert not conns.waiting_marker(cat.live_path).exists()  # the waiter cleaned up
    assert cat.query_rows("SELECT count(*) AS n FROM metrics WHERE run_id = 'waiter'") == [{"n": 1}]


def test_reads_in_a_session_stay_read_only(cat: Catalog) -> None:
    with catalog_session():
        with pytest.raises(CatalogError, match="read-only"):
            cat.query_rows("DELETE FROM metrics")
        with pytest.raises(CatalogError, match="read-only"), cat.held(read_only=True):
            cat.query_df("INSERT INTO metrics (run_id) VALUES ('x')")
        assert cat.query_rows("SELECT count(*) AS n FROM metrics") == [{"n": 2}]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_never_inherits_the_pooled_connection(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child forked while the session holds the file (e.g. a DataLoader worker) would
    get DuckDB's instance of it without the lock; the connection is closed before a fork,
    so the child opens the file itself and both processes' writes are kept."""
    monkeypatch.setattr(conns, "IDLE_CLOSE_S", 60.0)
    with catalog_session():
        cat.insert_rows("metrics", metric_rows(1, "parent-before"))
        assert conns._IDLE
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                Catalog(cat.path, lock_timeout=10).insert_rows("metrics", metric_rows(1, "child"))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        cat.insert_rows("metrics", metric_rows(1, "parent-after"))
    runs = {r["run_id"] for r in cat.query_rows("SELECT DISTINCT run_id FROM metrics")}
    assert runs == {"before", "parent-before", "child", "parent-after"}


def test_stage_events_publish_at_most_once_a_gap(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of events (a cached rerun's stage records) makes one copy now and one
    when the gap has passed, which holds the last event's rows."""
    monkeypatch.setattr(publish_mod, "PUBLISH_GAP", 3.0)
    copies: list[float] = []
    real = publish_mod.copy_fd
    monkeypatch.setattr(
        publish_mod, "copy_fd", lambda *a: copies.append(time.monotonic()) or real(*a)
    )
    publish_mod._state(cat.live_path, cat.path).last -= 3.0  # the fixture's publish: a gap ago
    for i in range(6):
        cat.insert_rows("metrics", metric_rows(1, f"event-{i}"))
        cat.publish(soon=True)
    assert len(copies) == 1
    deadline = time.monotonic() + 10
    while len(copies) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(copies) == 2 and copies[1] - copies[0] >= 2.9
    snap = Catalog(cat.path, snapshot=True)
    assert snap.query_rows("SELECT count(*) AS n FROM metrics WHERE run_id = 'event-5'") == [
        {"n": 1}
    ]


def test_look_ups_and_small_writes_import_no_pandas(tmp_path: Path) -> None:
    """DuckDB's Python client imports pandas to bind any parameter (~0.4 s): what a cached
    rerun reads and writes inlines its values as literals instead."""
    Catalog(tmp_path / "c.duckdb").insert_rows("metrics", metric_rows(2, "r"))
    script = textwrap.dedent(
        f"""
        import datetime, sys
        sys.path.insert(0, {str(REPO)!r})
        from tasks.catalog import Catalog
        c = Catalog({str(tmp_path / "c.duckdb")!r})
        c.replace_rows("stages", [{{"stage": "s", "status": "cached", "outputs": {{"a": 1}},
                       "started_at": datetime.datetime.now(datetime.UTC)}}],
                       where={{"run_id": "r", "stage": "s"}})
        c.upsert_rows("runs", [{{"run_id": "r", "status": "running"}}], key=["run_id"])
        rows = c.query_rows("SELECT count(*) AS n FROM metrics WHERE run_id = ? AND value < ?",
                            ["r", 5.5])
        assert rows == [{{"n": 2}}], rows
        print(sorted(m for m in ("pandas", "numpy") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize(
    ("sql", "params", "expected"),
    [
        ("SELECT ? AS a", ["it's"], "SELECT 'it''s' AS a"),
        ("SELECT '?' || ? AS \"a?\"", [1], "SELECT '?' || 1 AS \"a?\""),
        ("SELECT list_contains(?, 'x')", [["x", "y"]], "SELECT list_contains(['x', 'y'], 'x')"),
        ("SELECT ?", [None], "SELECT NULL"),
        ("SELECT ?", [True], "SELECT TRUE"),
    ],
)
def test_inlined_literals(sql: str, params: list, expected: str) -> None:
    inlined, left = inline_params(sql, params)
    assert (inlined, left) == (expected, None)
    assert duckdb.sql(inlined).fetchall() == duckdb.execute(sql, params).fetchall()


def test_values_without_an_exact_literal_stay_parameters() -> None:
    for params in ([{"a": 1}], [b"x"], ["nul\0"], [1, 2]):
        assert inline_params("SELECT ?", params) == ("SELECT ?", params)
    x = 0.1 + 0.2
    inlined, _ = inline_params("SELECT ?", [x])
    assert duckdb.sql(inlined).fetchone()[0] == x  # floats round-trip exactly
