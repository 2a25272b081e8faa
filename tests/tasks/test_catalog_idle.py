"""A pipeline run opens its catalog file a few times, not once per operation: inside
:func:`~tasks.catalog.connections.keep_idle` a closed connection stays idle for the next
operation in the same mode; a replaced file, another mode, the block's end or
``IDLE_CLOSE_S`` of idleness close it, so other code and processes get the file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from tasks.catalog import Catalog, connections


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every real ``duckdb.connect`` of a catalog file: (file name, read_only)."""
    seen: list[tuple[str, bool]] = []
    real = connections._connect

    def counted(path: Path, *, read_only: bool, **kw: object) -> duckdb.DuckDBPyConnection:
        seen.append((Path(path).name, read_only))
        return real(path, read_only=read_only, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(connections, "_connect", counted)
    return seen


def _row(i: int) -> dict[str, object]:
    return {"run_id": f"r{i}", "status": "completed", "profile": "smoke"}


def test_operations_in_a_run_share_one_connection(tmp_path: Path, connects: list) -> None:
    cat = Catalog(tmp_path / "cat.duckdb")
    cat.migrate()
    connects.clear()
    with connections.keep_idle():
        for i in range(5):
            cat.upsert_rows("runs", [_row(i)], key=["run_id"])
        for _ in range(5):
            assert len(cat.query_df("SELECT run_id FROM runs")) == 5
    writes = [c for c in connects if not c[1]]
    reads = [c for c in connects if c[1]]
    assert len(writes) == 1, connects  # five writes (and their publishes): one connection
    assert len(reads) <= 1, connects
    # after the block the file is closed: this process may open it in another mode
    duckdb.connect(str(cat.live_path), read_only=True).close()


def test_outside_a_run_every_operation_closes_the_file(tmp_path: Path, connects: list) -> None:
    cat = Catalog(tmp_path / "cat.duckdb")
    cat.migrate()
    cat.upsert_rows("runs", [_row(0)], key=["run_id"])
    duckdb.connect(str(cat.live_path), read_only=True).close()  # no idle writer in the way
    n = len(connects)
    cat.upsert_rows("runs", [_row(1)], key=["run_id"])
    assert len(connects) > n


def test_a_replaced_file_is_reopened(tmp_path: Path, connects: list) -> None:
    """An idle connection to a file since replaced (e.g. a rebuilt catalog installed) is
    not reused: it would write to the old file."""
    cat = Catalog(tmp_path / "cat.duckdb")
    cat.migrate()
    with connections.keep_idle():
        cat.upsert_rows("runs", [_row(0)], key=["run_id"])
        other = Catalog(tmp_path / "other.duckdb")
        other.migrate()
        other.upsert_rows("runs", [_row(7), _row(8)], key=["run_id"])
        cat.install(other)
        assert sorted(cat.query_df("SELECT run_id FROM runs").run_id) == ["r7", "r8"]
        cat.upsert_rows("runs", [_row(9)], key=["run_id"])
    con = duckdb.connect(str(cat.live_path), read_only=True)
    try:
        assert sorted(r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()) == [
            "r7",
            "r8",
            "r9",
        ]
    finally:
        con.close()


def test_an_idle_connection_lets_another_process_in(tmp_path: Path) -> None:
    """Another process waits for the file at most about IDLE_CLOSE_S while this one
    keeps it idle, and never for the whole block."""
    cat = Catalog(tmp_path / "cat.duckdb")
    cat.migrate()
    script = textwrap.dedent(
        f"""
        import time
        from tasks.catalog import Catalog
        t0 = time.monotonic()
        Catalog({str(cat.path)!r}).upsert_rows(
            "runs", [{{"run_id": "other", "status": "completed"}}], key=["run_id"])
        print(time.monotonic() - t0)
        """
    )
    with connections.keep_idle():
        cat.upsert_rows("runs", [_row(0)], key=["run_id"])  # now idle, holding the file
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "GPTFLOW_DB_LOCK_TIMEOUT": "60"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = set(cat.query_df("SELECT run_id FROM runs").run_id)
    assert {"r0", "other"} <= runs
