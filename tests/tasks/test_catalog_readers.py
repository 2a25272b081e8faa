"""Readers never block writers: notebooks holding the catalog open (read-only or
read-write) while gptflow writes, the published snapshot they read, and what becomes of
writes made into it."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from _paths import REPO
from helpers_catalog import metric_rows, published_catalog, record_stage
from helpers_notebook import Notebook

from flows.cli import main
from tasks.catalog import Catalog
from tasks.catalog import publish as publish_mod
from tasks.catalog.queries import run_readonly_sql

COUNT = "sql SELECT count(*) FROM metrics"
WRITE = "write INSERT INTO metrics (run_id, value) VALUES ('notebook', 1)"


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return published_catalog(tmp_path / "cat.duckdb", 3, lock_timeout=2)


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_a_notebook_holding_the_catalog_never_blocks_writers(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch, read_only: bool
) -> None:
    notebook = Notebook(cat.path, read_only=read_only)
    try:
        assert notebook.ask(COUNT) == "3"
        # a run writes and publishes while the notebook holds the file (lock timeout 2 s)
        writer = Catalog(cat.path, lock_timeout=2)
        writer.insert_rows("metrics", metric_rows(4, "during"))
        record_stage(writer, "during", "pretrain", status="completed")
        assert writer.publish()
        # the notebook keeps its snapshot; on reconnect it sees the new data
        assert notebook.ask(COUNT) == "3"
        assert notebook.ask("reconnect") == "open"
        assert notebook.ask(COUNT) == "7"
        # gptflow's own readers answer at once while the notebook holds the file
        monkeypatch.setenv("GPTFLOW_DB_LOCK_TIMEOUT", "0")
        snap = Catalog(cat.path, snapshot=True)
        assert snap.query_df("SELECT count(*) AS n FROM metrics").n[0] == 7
        assert run_readonly_sql(cat.path, "SELECT count(*) AS n FROM metrics").n[0] == 7
        assert run_readonly_sql(cat.path, "SELECT count(*) AS n FROM stages", live=True).n[0] == 1
        assert main(["runs", "--db", str(cat.path)]) == 0
    finally:
        notebook.close()


def test_writes_into_the_published_file_are_discarded_never_replayed(
    cat: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    rw = Notebook(cat.path, read_only=False)
    try:
        assert rw.ask(WRITE) == "wrote"  # its WAL now lies beside the published file
        assert publish_mod.wal_of(cat.path).exists()
        cat.insert_rows("metrics", metric_rows(2, "after"))
        with caplog.at_level(logging.WARNING, logger="tasks.catalog.publish"):
            assert cat.publish()
        assert "writes are discarded" in caplog.text and str(cat.path) in caplog.text
        assert not publish_mod.wal_of(cat.path).exists()
        # a new reader sees the writers' rows, never the notebook's
        con = duckdb.connect(str(cat.path), read_only=True)
        try:
            runs = dict(con.execute("SELECT run_id, count(*) FROM metrics GROUP BY 1").fetchall())
        finally:
            con.close()
        assert runs == {"before": 3, "after": 2}
    finally:
        rw.close()


def test_a_one_file_catalog_of_an_older_gptflow_is_taken_over(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    Catalog(db).migrate()
    Path(str(db) + ".live").unlink()  # what an older gptflow left: one file...
    killed = textwrap.dedent(
        f"""
        import duckdb, os
        con = duckdb.connect({str(db)!r})
        con.execute("CHECKPOINT")
        con.execute("INSERT INTO metrics (run_id, value) VALUES ('unchecked', 1)")
        os._exit(0)  # ...and a writer killed before its WAL was checkpointed
        """
    )
    subprocess.run([sys.executable, "-c", killed], check=True)
    assert publish_mod.wal_of(db).exists()
    cat = Catalog(db)
    cat.insert_rows("metrics", metric_rows(1, "new"))
    assert cat.publish()
    got = Catalog(db, snapshot=True).query_df("SELECT run_id FROM metrics ORDER BY run_id")
    assert got.run_id.tolist() == ["new", "unchecked"]


def test_plain_writes_publish_at_most_every_interval_and_at_exit(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def published_count() -> int:
        con = duckdb.connect(str(cat.path), read_only=True)
        try:
            return con.execute("SELECT count(*) FROM metrics").fetchone()[0]
        finally:
            con.close()

    monkeypatch.setattr(publish_mod, "PUBLISH_EVERY", 3600.0)
    cat.insert_rows("metrics", metric_rows(1, "x"))  # published just before: not due yet
    assert published_count() == 3
    monkeypatch.setattr(publish_mod, "PUBLISH_EVERY", 0.0)
    cat.insert_rows("metrics", metric_rows(1, "y"))
    assert published_count() == 5
    assert not cat.publish()  # nothing new
    # another process writes (never due) and exits: its writes are published at exit
    child = textwrap.dedent(
        f"""
        from tasks.catalog import Catalog, publish
        publish.PUBLISH_EVERY = 1e9
        Catalog({str(cat.path)!r}).insert_rows("metrics", [{{"run_id": "child"}}] * 2)
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, cwd=REPO)
    assert published_count() == 7
