"""The DuckDB catalog: migrations, transactional writes, locking, views, `gptflow sql`."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from _paths import REPO
from helpers_catalog import (
    record_checkpoint,
    record_metrics,
    record_source,
    record_stage,
    start_run,
)

from flows.cli import main as cli_main
from gpt.errors import CatalogError
from tasks.catalog import Catalog
from tasks.catalog import tables as catalog_tables
from tasks.catalog.present import format_df
from tasks.catalog.queries import run_readonly_sql
from tasks.catalog.schema import KNOWN_TABLES, SCHEMA_VERSION
from tasks.catalog.settings import DEFAULT_LOCK_TIMEOUT
from tasks.catalog.views import KNOWN_VIEWS


def _objects(path: Path) -> tuple[set[str], set[str]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_schema = 'main'"
        ).fetchall()
    finally:
        con.close()
    tables = {n for n, t in rows if t == "BASE TABLE"}
    views = {n for n, t in rows if t == "VIEW"}
    return tables, views


def _count(path: Path, sql: str) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "cat.duckdb", lock_timeout=10)
    c.migrate()
    return c


# ----------------------------------------------------------------------------- schema


def test_migrations_create_everything_and_are_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "m.duckdb"
    c = Catalog(db)
    assert c.migrate() == SCHEMA_VERSION
    tables, views = _objects(db)
    assert tables == set(KNOWN_TABLES) | {"schema_version"}
    assert views == set(KNOWN_VIEWS)
    # again, and through a fresh instance: nothing re-applied
    assert c.migrate() == SCHEMA_VERSION
    assert Catalog(db).migrate() == SCHEMA_VERSION
    versions = duckdb.connect(str(db), read_only=True)
    try:
        got = [
            r[0]
            for r in versions.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        ]
    finally:
        versions.close()
    assert got == list(range(1, SCHEMA_VERSION + 1))
    # interface column names users query
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = {
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'metrics'"
            ).fetchall()
        }
        jtype = con.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'runs' AND column_name = 'config'"
        ).fetchone()[0]
    finally:
        con.close()
    assert cols == {"run_id", "stage", "step", "epoch", "seen", "split", "name", "value", "time"}
    assert jtype == "JSON"


def test_upgrade_from_older_version_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    old = Catalog(db)
    assert old.migrate(target=1) == 1
    tables, views = _objects(db)
    assert "judgments" not in tables and not views
    old.insert_rows("metrics", [{"run_id": "r", "stage": "s", "name": "loss", "value": 1.5}])
    new = Catalog(db)
    # the first write-open migrates
    record_metrics(new, "r", "s", [{"name": "loss", "value": 0.5}])
    tables, views = _objects(db)
    assert set(KNOWN_TABLES) <= tables and views == set(KNOWN_VIEWS)
    assert new.query_rows("SELECT max(version) AS v FROM schema_version")[0]["v"] == SCHEMA_VERSION
    vals = sorted(new.query_df("SELECT value FROM metrics")["value"].tolist())
    assert vals == [0.5, 1.5]


def test_newer_schema_is_refused(cat: Catalog) -> None:
    con = duckdb.connect(str(cat.live_path))  # as a newer gptflow's writer would
    con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 5])
    con.close()
    with pytest.raises(CatalogError, match=r"newer than this gptflow knows"):
        Catalog(cat.path).migrate()
    with pytest.raises(CatalogError, match=str(cat.path)):
        Catalog(cat.path).query_df("SELECT 1")


def test_unknown_table_and_columns_rejected(cat: Catalog) -> None:
    with pytest.raises(CatalogError, match="unknown catalog table"):
        cat.insert_rows("metrics; DROP TABLE runs; --", [{"value": 1.0}])
    with pytest.raises(CatalogError, match="not in catalog table 'metrics'"):
        cat.insert_rows("metrics", [{"valu": 1.0}])
    with pytest.raises(CatalogError, match="where-column"):
        cat.replace_rows("metrics", [{"value": 1.0}], where={"nope": 1})
    assert "runs" in _objects(cat.path)[0]


# ----------------------------------------------------------------------------- writes


def _metric_rows(n: int, base: float) -> list[dict]:
    return [
        {"step": i, "epoch": 0, "seen": 10 * i, "split": "train", "name": "loss", "value": base + i}
        for i in range(n)
    ]


def test_replace_rows_only_touches_its_run_and_stage(cat: Catalog) -> None:
    for run in ("a", "b"):
        for stage in ("pretrain", "finetune_spam"):
            cat.replace_rows(
                "metrics",
                pd.DataFrame(_metric_rows(3, 100.0)),
                where={"run_id": run, "stage": stage},
            )
    assert _count(cat.live_path, "SELECT count(*) FROM metrics") == 12
    # rerun of (a, pretrain) with different rows: replaced, not appended
    n = cat.replace_rows(
        "metrics", _metric_rows(2, 0.0), where={"run_id": "a", "stage": "pretrain"}
    )
    assert n == 2
    df = cat.query_df(
        "SELECT run_id, stage, count(*) AS n, sum(value) AS s FROM metrics GROUP BY 1, 2 ORDER BY 1, 2"
    )
    got = {(r.run_id, r.stage): (r.n, r.s) for r in df.itertuples()}
    assert got == {
        ("a", "finetune_spam"): (3, 303.0),
        ("a", "pretrain"): (2, 1.0),
        ("b", "finetune_spam"): (3, 303.0),
        ("b", "pretrain"): (3, 303.0),
    }
    # missing columns become NULL
    assert _count(cat.live_path, "SELECT count(*) FROM metrics WHERE time IS NULL") == 11


def test_failed_value_mid_write_rolls_back(cat: Catalog) -> None:
    cat.replace_rows("metrics", _metric_rows(3, 1.0), where={"run_id": "r", "stage": "s"})
    before = cat.query_df("SELECT * FROM metrics ORDER BY step")
    bad = [*_metric_rows(2, 50.0), {"step": 9, "name": "loss", "value": "not-a-number"}]
    with pytest.raises(CatalogError, match="rolled back"):
        cat.replace_rows("metrics", bad, where={"run_id": "r", "stage": "s"})
    after = cat.query_df("SELECT * FROM metrics ORDER BY step")
    pd.testing.assert_frame_equal(before, after)
    assert after["value"].tolist() == [1.0, 2.0, 3.0]


def test_exception_after_delete_rolls_back(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    cat.replace_rows(
        "spam_examples",
        [{"idx": 0, "label": "ham", "text": "hi"}],
        where={"run_id": "r", "split": "train"},
    )
    calls: list[str] = []
    real_delete = catalog_tables.delete_where

    def delete_then_note(con, table, where, cols):
        real_delete(con, table, where, cols)
        # inside the transaction the old row is really gone
        calls.append(con.execute("SELECT count(*) FROM spam_examples").fetchone()[0])

    def boom(*args, **kwargs):
        raise RuntimeError("injected crash after DELETE")

    monkeypatch.setattr(catalog_tables, "delete_where", delete_then_note)
    monkeypatch.setattr(catalog_tables, "insert_typed", boom)
    with pytest.raises(RuntimeError, match="injected"):
        cat.replace_rows(
            "spam_examples",
            [{"idx": 5, "label": "spam", "text": "win"}],
            where={"run_id": "r", "split": "train"},
        )
    assert calls == [0]
    monkeypatch.undo()
    df = cat.query_df("SELECT run_id, split, idx, label, text FROM spam_examples")
    assert df.to_dict("records") == [
        {"run_id": "r", "split": "train", "idx": 0, "label": "ham", "text": "hi"}
    ]


def test_replace_where_none_matches_null_only(cat: Catalog) -> None:
    """A ``where`` value None names the rows holding NULL there (and no others)."""
    cat.insert_rows(
        "corpus",
        [
            {"run_id": "r", "split": None, "chars": 1},
            {"run_id": "r", "split": "train", "chars": 2},
            {"run_id": None, "split": None, "chars": 3},
        ],
    )
    cat.replace_rows("corpus", [{"chars": 9}], where={"run_id": "r", "split": None})
    df = cat.query_df("SELECT run_id, split, chars FROM corpus ORDER BY chars")
    assert df.astype(object).where(df.notna(), None).values.tolist() == [
        ["r", "train", 2],
        [None, None, 3],
        ["r", None, 9],
    ]


def test_held_runs_every_transaction_on_one_connection(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``held()`` writes and reads share one open file (a rebuild's many small
    transactions open and checkpoint it once); a failed transaction still rolls back
    alone, and the rows are there for other handles after the block."""
    from tasks.catalog import store

    opened: list[bool] = []
    real_open = store.open_file

    def counting(path, *, read_only, timeout, config=None):
        opened.append(read_only)
        return real_open(path, read_only=read_only, timeout=timeout, config=config)

    monkeypatch.setattr(store, "open_file", counting)
    with cat.held():
        for run in ("a", "b", "c"):
            cat.replace_rows("corpus", [{"chars": 1}], where={"run_id": run, "split": "train"})
        with pytest.raises(CatalogError, match="rolled back"):
            cat.replace_rows("corpus", [{"chars": "x"}], where={"run_id": "a", "split": "train"})
        assert cat.query_df("SELECT count(*) AS n FROM corpus").n.tolist() == [3]
    assert opened == [False]
    monkeypatch.undo()
    df = Catalog(cat.path, snapshot=True).query_df("SELECT run_id FROM corpus ORDER BY run_id")
    assert df.run_id.tolist() == ["a", "b", "c"]


def test_held_read_only_reads_one_snapshot_and_refuses_writes(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``held(read_only=True)`` serves a command's queries from one reader of the
    published file; a write through the handle is refused with the reason."""
    from tasks.catalog import store

    cat.replace_rows("corpus", [{"chars": 1}], where={"run_id": "a", "split": "train"})
    cat.publish()
    reader = Catalog(cat.path, snapshot=True)
    opened: list[bool] = []
    real_open = store.open_file

    def counting(path, *, read_only, timeout, config=None):
        opened.append(read_only)
        return real_open(path, read_only=read_only, timeout=timeout, config=config)

    monkeypatch.setattr(store, "open_file", counting)
    with reader.held(read_only=True):
        for _ in range(3):
            assert reader.query_df("SELECT count(*) AS n FROM corpus").n.tolist() == [1]
    assert opened == [True]
    with cat.held(read_only=True), pytest.raises(CatalogError, match="read-only connection"):
        cat.replace_rows("corpus", [{"chars": 2}], where={"run_id": "a", "split": "train"})
    assert cat.query_df("SELECT chars FROM corpus").chars.tolist() == [1]


def test_process_killed_mid_write_leaves_old_rows(cat: Catalog) -> None:
    cat.replace_rows("metrics", _metric_rows(4, 0.0), where={"run_id": "r", "stage": "s"})
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from tasks.catalog import Catalog, tables
        def die(*a, **k):
            os._exit(3)  # hard crash: no rollback, no close
        tables.insert_typed = die
        Catalog({str(cat.path)!r}).replace_rows(
            "metrics", [{{"value": 99.0}}], where={{"run_id": "r", "stage": "s"}})
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    vals = Catalog(cat.path).query_df("SELECT value FROM metrics ORDER BY step")["value"].tolist()
    assert vals == [0.0, 1.0, 2.0, 3.0]


def test_upsert_and_lineage_helpers(cat: Catalog, tmp_path: Path) -> None:
    start_run(
        cat, "r1", profile="tiny", config={"lr": 0.0004, "nested": {"a": [1, 2]}}, git_rev="abc"
    )
    record_stage(cat, "r1", "pretrain", status="running")
    record_stage(cat, "r1", "pretrain", status="completed", cache_hit=False, outputs={"ckpt": "x"})
    record_source(cat, "the-verdict", "https://example/v.txt", "f" * 64, 20479)
    record_source(cat, "the-verdict", "https://example/v2.txt", "e" * 64, 20480)
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"\x00" * 1000 + b"weights")
    (ck / "config.json").write_text("{}")
    record_checkpoint(cat, "r1", "pretrain", ck, config={"emb_dim": 32})
    record_checkpoint(cat, "r1", "pretrain", ck, config={"emb_dim": 32})
    cat.end_run("r1", "completed")

    runs = cat.query_df("SELECT * FROM runs")
    assert len(runs) == 1 and runs.status[0] == "completed"
    assert json.loads(runs.config[0]) == {"lr": 0.0004, "nested": {"a": [1, 2]}}
    assert runs.ended_at[0] >= runs.started_at[0]
    st = cat.query_df("SELECT * FROM stages")
    assert len(st) == 1 and st.status[0] == "completed" and not st.cache_hit[0]
    assert st.started_at[0] <= st.ended_at[0]  # kept from the 'running' record
    assert json.loads(st.outputs[0]) == {"ckpt": "x"}
    src = cat.query_df("SELECT * FROM sources")
    assert src.to_dict("records")[0]["bytes"] == 20480 and len(src) == 1
    cks = cat.query_df("SELECT * FROM checkpoints")
    import hashlib

    assert len(cks) == 1
    assert cks.sha256[0] == hashlib.sha256(b"\x00" * 1000 + b"weights").hexdigest()
    assert cks.bytes[0] == 1007
    # timestamps are UTC
    now_utc = pd.Timestamp.now(tz="UTC").tz_localize(None)
    assert abs((runs.started_at[0] - now_utc).total_seconds()) < 60


# ----------------------------------------------------------------------------- locking

_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from tasks.catalog import Catalog
    c = Catalog({db!r}, lock_timeout=30)
    wid = sys.argv[1]
    for i in range(30):
        c.insert_rows("metrics", [{{"run_id": wid, "stage": "s", "step": i, "value": float(i)}}])
        if i % 5 == 4:
            c.replace_rows("corpus", [{{"chars": i}}], where={{"run_id": wid, "split": "train"}})
    """
)


def test_two_processes_writing_concurrently_lose_nothing(cat: Catalog) -> None:
    script = _WRITER.format(repo=str(REPO), db=str(cat.path))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"w{k}"], stderr=subprocess.PIPE, text=True)
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    df = cat.query_df(
        "SELECT run_id, count(*) AS n, count(DISTINCT step) AS d, sum(value) AS s "
        "FROM metrics GROUP BY run_id ORDER BY run_id"
    )
    assert df.run_id.tolist() == ["w0", "w1"]
    assert df.n.tolist() == [30, 30] and df.d.tolist() == [30, 30]
    assert df.s.tolist() == [435.0, 435.0]
    assert _count(cat.live_path, "SELECT count(*) FROM metrics") == 60
    corpus = cat.query_df("SELECT run_id, chars FROM corpus ORDER BY run_id")
    assert corpus.to_dict("records") == [
        {"run_id": "w0", "chars": 29},
        {"run_id": "w1", "chars": 29},
    ]


_HOLDER = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect({db!r})
    print("locked", flush=True)
    time.sleep({hold})
    con.close()
    """
)


def _hold_lock(db: Path, hold: float) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(db=str(db), hold=hold)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_lock_held_too_long_raises_naming_file_and_pid(cat: Catalog) -> None:
    holder = _hold_lock(cat.live_path, 20)  # another writer
    try:
        short = Catalog(cat.path, lock_timeout=0.8)
        t0 = time.monotonic()
        with pytest.raises(CatalogError) as ei:
            short.insert_rows("metrics", [{"value": 1.0}])
        assert time.monotonic() - t0 < 5
        msg = str(ei.value)
        assert str(cat.live_path) in msg and f"PID {holder.pid}" in msg
        with pytest.raises(CatalogError, match=f"PID {holder.pid}"):
            short.query_df("SELECT 1")
    finally:
        holder.kill()
        holder.wait()


def test_lock_released_in_time_is_retried(cat: Catalog) -> None:
    holder = _hold_lock(cat.live_path, 1.0)
    try:
        t0 = time.monotonic()
        Catalog(cat.path, lock_timeout=15).insert_rows("metrics", [{"value": 7.0}])
        assert time.monotonic() - t0 > 0.3  # it did wait for the holder
    finally:
        holder.wait(timeout=30)
    assert cat.query_df("SELECT value FROM metrics")["value"].tolist() == [7.0]


# ----------------------------------------------------------------------------- views


def test_views_compute_correct_numbers(cat: Catalog) -> None:
    # a stale first attempt, then a rerun with replace=True: the stale row must go
    record_metrics(
        cat, "r1", "finetune_spam", [{"split": "train", "name": "final_accuracy", "value": 0.3}]
    )
    record_metrics(
        cat,
        "r1",
        "finetune_spam",
        [
            {"split": "test", "name": "final_accuracy", "value": 0.95},
            {"split": "val", "name": "final_accuracy", "value": 0.97},
            {"split": "test", "name": "final_f1", "value": 0.5},
        ],
        replace=True,
    )
    record_metrics(
        cat, "r1", "pretrain", [{"split": "test", "name": "final_accuracy", "value": 0.1}]
    )
    cat.replace_rows(
        "baselines",
        [
            {"model": "logreg_bow", "split": "test", "accuracy": 0.9},
            {"model": "logreg_tfidf", "split": "test", "accuracy": 0.92},
            {"model": "majority", "split": "test", "accuracy": 0.5},
            {"model": "majority", "split": "train", "accuracy": 0.5},
        ],
        where={"run_id": "r1"},
    )
    sa = cat.query_df("SELECT * FROM spam_accuracy ORDER BY split")
    assert list(sa.columns) == [
        "run_id",
        "split",
        "finetuned",
        "logreg_bow",
        "logreg_tfidf",
        "majority",
    ]
    recs = {r["split"]: r for r in json.loads(format_df(sa, "json"))}
    assert recs["test"] == {
        "run_id": "r1", "split": "test", "finetuned": 0.95,
        "logreg_bow": 0.9, "logreg_tfidf": 0.92, "majority": 0.5,
    }  # fmt: skip
    assert recs["val"]["finetuned"] == 0.97 and recs["val"]["majority"] is None
    assert recs["train"]["finetuned"] is None and recs["train"]["majority"] == 0.5

    scores = [80, 65, None, 90, 40, None, 100]
    cat.replace_rows(
        "responses",
        [
            {"example_id": i, "instruction": f"i{i}", "output": f"o{i}", "response": f"r{i}"}
            for i in range(8)
        ],
        where={"run_id": "r1"},
    )
    cat.replace_rows(
        "judgments",
        [
            {"example_id": i, "judge_model": "llama3", "prompt_version": "v1", "score": s,
             "raw_reply": str(s), "error": None if s is not None else "no number"}
            for i, s in enumerate(scores)
        ]
        + [{"example_id": 0, "judge_model": "other", "prompt_version": "v1", "score": 10}],
        where={"run_id": "r1"},
    )  # fmt: skip
    es = cat.query_df("SELECT * FROM eval_summary ORDER BY judge_model")
    ok = [s for s in scores if s is not None]
    row = es[es.judge_model == "llama3"].iloc[0]
    assert row.n == 7 and row.n_scored == 5 and row.n_failed == 2
    assert row.mean_score == pytest.approx(statistics.mean(ok))
    assert row.median_score == pytest.approx(statistics.median(ok))
    assert (row.min_score, row.max_score) == (min(ok), max(ok))
    other = es[es.judge_model == "other"].iloc[0]
    assert (other.n, other.n_scored, other.mean_score) == (1, 1, 10.0)

    ex = cat.query_df(
        "SELECT * FROM eval_examples WHERE judge_model = 'llama3' OR judge_model IS NULL "
        "ORDER BY example_id"
    )
    assert ex.example_id.tolist() == list(range(8))
    assert ex.response.tolist() == [f"r{i}" for i in range(8)]
    got_scores = [None if pd.isna(v) else int(v) for v in ex.score]
    assert got_scores == [*scores, None]  # example 7 has no judgment: LEFT JOIN keeps it
    assert pd.isna(ex.judge_model.iloc[7])


# ----------------------------------------------------------------------------- gptflow sql


def _seed_small(cat: Catalog) -> None:
    record_metrics(
        cat,
        "r1",
        "pretrain",
        [
            {"step": 1, "split": "train", "name": "loss", "value": 9.5},
            {"step": 2, "split": "train", "name": "loss", "value": 7.25},
        ],
    )
    cat.replace_rows(
        "instructions",
        [{"idx": 0, "instruction": "x" * 200, "input": "a,b", "output": 'say "hi"\nbye'}],
        where={"run_id": "r1", "split": "train"},
    )


@pytest.mark.parametrize(
    "stmt",
    [
        "INSERT INTO metrics (run_id, value) VALUES ('evil', 1)",
        "DELETE FROM metrics",
        "CREATE TABLE evil (a INTEGER)",
        "DROP TABLE metrics",
        "UPDATE metrics SET value = 0",
        "COPY metrics TO 'out.csv'",
    ],
)
def test_sql_refuses_writes(
    cat: Catalog,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    stmt: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    _seed_small(cat)
    before = cat.query_df("SELECT * FROM metrics ORDER BY step")
    rc = cli_main(["sql", stmt, "--db", str(cat.path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "gptflow sql: error: the catalog is opened read-only by `gptflow sql`" in err
    with pytest.raises(CatalogError, match="opened read-only"):
        run_readonly_sql(cat.path, stmt)
    pd.testing.assert_frame_equal(before, cat.query_df("SELECT * FROM metrics ORDER BY step"))
    assert _objects(cat.path) == (set(KNOWN_TABLES) | {"schema_version"}, set(KNOWN_VIEWS))
    assert not Path("out.csv").exists()


def test_sql_missing_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb")])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist yet; run the pipeline first" in err
    assert not (tmp_path / "none.duckdb").exists()


def test_sql_formats(
    cat: Catalog, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_small(cat)
    q = "SELECT step, name, value FROM metrics ORDER BY step"
    monkeypatch.setenv("GPTFLOW_DB", str(cat.path))  # no --db: the default path is used

    assert cli_main(["sql", q, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [
        {"step": "1", "name": "loss", "value": "9.5"},
        {"step": "2", "name": "loss", "value": "7.25"},
    ]

    assert cli_main(["sql", q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"step": 1, "name": "loss", "value": 9.5},
        {"step": 2, "name": "loss", "value": 7.25},
    ]

    assert cli_main(["sql", q]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" | ") == ["step", "name", "value"]
    assert set(lines[1]) <= {"-", "+"}
    assert [c.strip() for c in lines[2].split("|")] == ["1", "loss", "9.5"]
    assert [c.strip() for c in lines[3].split("|")] == ["2", "loss", "7.25"]
    assert lines[-1] == "(2 rows)"
    # aligned: every separator at the same offsets
    assert (
        len({tuple(i for i, ch in enumerate(ln) if ch == "|") for ln in [*lines[2:4], lines[0]]})
        == 1
    )

    # long cells truncated in table mode only; csv/json keep the full text
    q2 = "SELECT instruction, output FROM instructions"
    assert cli_main(["sql", q2]) == 0
    out = capsys.readouterr().out
    assert "x" * 57 + "..." in out and "x" * 61 not in out
    assert 'say "hi"\\nbye' in out
    assert cli_main(["sql", q2, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"instruction": "x" * 200, "output": 'say "hi"\nbye'}]
    assert cli_main(["sql", q2, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"instruction": "x" * 200, "output": 'say "hi"\nbye'}
    ]


def test_sql_live_waits_for_a_brief_writer_lock(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_small(cat)
    monkeypatch.setenv("GPTFLOW_DB_LOCK_TIMEOUT", "15")
    holder = _hold_lock(cat.live_path, 0.8)  # a writer in a transaction
    try:
        df = run_readonly_sql(cat.path, "SELECT count(*) AS n FROM metrics", live=True)
    finally:
        holder.wait(timeout=30)
    assert df.n.tolist() == [2]
    assert DEFAULT_LOCK_TIMEOUT == 60.0
