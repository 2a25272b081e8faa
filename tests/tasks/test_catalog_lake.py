"""The shared catalog: DuckLake on a throwaway PostgreSQL (and on a moto S3 endpoint).

Writers in several processes lose nothing, migrations race safely, write conflicts are
re-run, ``gptflow sql`` and the eval views answer exactly as on the DuckDB file, and
``gptflow sql`` cannot change the lake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from _paths import REPO
from helpers_catalog import record_metrics, record_stage, start_run

from flows.cli import main as cli_main
from gpt.errors import CatalogError
from tasks.catalog import Catalog
from tasks.catalog import tables as catalog_tables
from tasks.catalog.connections import (
    CONFLICT_RETRIES,
    LAKE_ALIAS,
    is_conflict,
    new_lake_connection,
    retry_on_conflict,
)
from tasks.catalog.extensions import load_extension
from tasks.catalog.queries import run_readonly_sql
from tasks.catalog.schema import KNOWN_TABLES, MIGRATIONS, SCHEMA_VERSION, lake_ddl
from tasks.catalog.settings import CatalogSettings, S3Settings
from tasks.catalog.views import KNOWN_VIEWS


@pytest.fixture
def lake(postgres_server, tmp_path: Path) -> CatalogSettings:
    """Settings of a new, empty DuckLake (its own database and data folder)."""
    db = postgres_server.create_database()
    return CatalogSettings(
        url=postgres_server.ducklake_url(db), data_path=str(tmp_path / "lake-data"), lock_timeout=60
    )


def _use_lake(monkeypatch: pytest.MonkeyPatch, settings: CatalogSettings) -> None:
    """Point the environment (and so `gptflow sql` and child processes) at the lake."""
    monkeypatch.setenv("GPTFLOW_CATALOG_URL", str(settings.url))
    monkeypatch.setenv("GPTFLOW_CATALOG_DATA_PATH", str(settings.data_path))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def _sql_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert cli_main(["sql", *args, "--format", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _data_files(settings: CatalogSettings) -> list[str]:
    root = Path(str(settings.data_path))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _lake_state(settings: CatalogSettings) -> tuple:
    """Everything `gptflow sql` must leave alone: the data files, the latest snapshot and
    every table's rows."""
    cat = Catalog(settings=settings)
    snapshot = cat.query_df(f"SELECT max(snapshot_id) AS s FROM {LAKE_ALIAS}.snapshots()")
    tables = {t: cat.query_df(f"SELECT * FROM {t} ORDER BY ALL") for t in sorted(KNOWN_TABLES)}
    return _data_files(settings), int(snapshot["s"][0]), tables


def _assert_same_state(now: tuple, before: tuple) -> None:
    assert now[:2] == before[:2]
    for table, df in before[2].items():
        pd.testing.assert_frame_equal(now[2][table], df, obj=table)


# ----------------------------------------------------------------------------- no server


def test_settings_from_env_and_validation(tmp_path: Path) -> None:
    env = {"GPTFLOW_DB": str(tmp_path / "x.duckdb"), "GPTFLOW_DB_LOCK_TIMEOUT": "7"}
    s = CatalogSettings.from_env(env)
    assert not s.is_lake and s.file_path() == tmp_path / "x.duckdb" and s.lock_timeout == 7
    env = {
        "GPTFLOW_CATALOG_URL": "ducklake:postgres:dbname=l host=h port=5 user=u password=hush",
        "GPTFLOW_CATALOG_DATA_PATH": "s3://bucket/pre",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "GPTFLOW_CATALOG_S3_REGION": "eu-west-1",
    }
    s = CatalogSettings.from_env(env)
    assert s.is_lake and s.on_s3 and s.metadata_kind == "postgres"
    assert s.data_path == "s3://bucket/pre/"  # a prefix always ends with /
    assert s.s3.duckdb_endpoint() == ("127.0.0.1:9000", False)
    assert (s.s3.key_id, s.s3.region, s.s3.url_style) == ("key", "eu-west-1", "path")
    assert "hush" not in s.location() and "hush" not in repr(Catalog(settings=s))
    assert "s3cr3t-value" not in repr(s) and "hush" not in repr(s)
    with pytest.raises(CatalogError, match="needs a data_path"):
        CatalogSettings.from_env({"GPTFLOW_CATALOG_URL": "ducklake:postgres:dbname=l"})
    with pytest.raises(CatalogError, match="not a DuckLake URL"):
        CatalogSettings.from_env({"GPTFLOW_CATALOG_URL": "postgres://h/l"})
    with pytest.raises(CatalogError, match="GPTFLOW_DB_LOCK_TIMEOUT"):
        CatalogSettings.from_env({"GPTFLOW_DB_LOCK_TIMEOUT": "soon"})
    with pytest.raises(CatalogError, match="GPTFLOW_CATALOG_S3"):
        S3Settings.from_env({"GPTFLOW_CATALOG_S3_URL_STYLE": "sideways"})


def test_catalog_constructor_keeps_the_file_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Catalog(tmp_path / "a.duckdb").path == tmp_path / "a.duckdb"
    assert Catalog().path == tmp_path / "catalog.duckdb"  # GPTFLOW_DB of the test
    monkeypatch.setenv("GPTFLOW_CATALOG_URL", "ducklake:postgres:dbname=l host=h")
    monkeypatch.setenv("GPTFLOW_CATALOG_DATA_PATH", str(tmp_path / "d"))
    lake = Catalog()  # the environment selects the lake; nothing is opened yet
    assert lake.is_lake and lake.path is None
    assert lake.settings.data_path == str(tmp_path / "d") + "/"
    assert not Catalog(tmp_path / "b.duckdb").is_lake  # an explicit path is a file
    explicit = Catalog(url="ducklake:postgres:dbname=m", data_path="s3://b/p", lock_timeout=3)
    assert explicit.is_lake and explicit.lock_timeout == 3 and explicit.settings.on_s3


def test_lake_ddl_drops_only_primary_keys() -> None:
    for step in MIGRATIONS:
        for stmt in step:
            out = lake_ddl(stmt)
            assert "PRIMARY KEY" not in out.upper()
            if "PRIMARY KEY" not in stmt:
                assert out == stmt
    runs = lake_ddl(MIGRATIONS[0][0])
    assert "run_id VARCHAR," in runs and "config JSON" in runs
    stages = lake_ddl(MIGRATIONS[0][1])
    assert stages.rstrip().endswith("message VARCHAR)")
    assert "run_id VARCHAR NOT NULL" in stages


def test_conflict_retries_are_bounded() -> None:
    calls: list[int] = []

    def always() -> None:
        calls.append(1)
        raise duckdb.TransactionException("Transaction conflict - attempting to delete")

    with pytest.raises(CatalogError, match=r"kept conflicting with other writers: \d+ attempts"):
        retry_on_conflict(always, timeout=0.5, what="writing corpus", where="somewhere")
    assert len(calls) >= 2
    n = len(calls)

    def nested() -> None:  # an exhausted inner retry is not re-run by an outer one
        retry_on_conflict(always, timeout=0, what="inner", where="somewhere")

    with pytest.raises(CatalogError, match="inner on the catalog somewhere kept conflicting"):
        retry_on_conflict(nested, timeout=30, what="outer", where="somewhere")
    assert len(calls) == n + 1

    def flaky() -> str:
        calls.append(2)
        if calls.count(2) < 3:
            raise CatalogError("wrapped") from duckdb.CatalogException(
                'Table "runs" has been created by another transaction already'
            )
        return "done"

    before = CONFLICT_RETRIES["flaky"]
    assert retry_on_conflict(flaky, timeout=30, what="flaky", where="x") == "done"
    assert CONFLICT_RETRIES["flaky"] - before == 2

    def other() -> None:
        calls.append(3)
        raise duckdb.ConversionException("Could not convert string 'x' to DOUBLE")

    with pytest.raises(duckdb.ConversionException):
        retry_on_conflict(other, timeout=30, what="x", where="x")
    assert calls.count(3) == 1  # not a conflict: not retried
    assert not is_conflict(ValueError("Transaction"))


def test_missing_extension_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tasks.catalog import extensions

    monkeypatch.setattr(extensions, "packaged_file", lambda name, version: None)
    con = duckdb.connect(
        config={
            "extension_directory": str(tmp_path / "ext"),
            "custom_extension_repository": "http://127.0.0.1:9/none",
            "autoinstall_known_extensions": False,
        }
    )
    try:
        with pytest.raises(CatalogError) as info:
            load_extension(con, "ducklake")
    finally:
        con.close()
    msg = str(info.value)
    assert "pip install 'gptflow[lake]'" in msg and "duckdb-extension-ducklake==1.5.5" in msg


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_postgres_fails_under_ci_and_skips_elsewhere(
    ci: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import _servers

    monkeypatch.setattr(_servers, "pg_binary", lambda name: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="PostgreSQL binaries"), _servers.postgres_server():
        pass


def test_extensions_load_from_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    con = duckdb.connect(config={"extension_directory": str(tmp_path / "ext")})
    try:
        assert load_extension(con, "ducklake") == "package"
        assert load_extension(con, "postgres_scanner") == "package"
        assert load_extension(con, "ducklake") == "loaded"
        loaded = {
            r[0]
            for r in con.execute(
                "SELECT extension_name FROM duckdb_extensions() WHERE loaded"
            ).fetchall()
        }
    finally:
        con.close()
    assert {"ducklake", "postgres_scanner"} <= loaded
    assert not (tmp_path / "ext").exists()  # nothing copied into DuckDB's extension folder
    (link,) = (tmp_path / "cache" / "gptflow" / "duckdb-extensions").glob("*/postgres_scanner.*")
    assert link.is_symlink() and link.resolve().name == "postgres.duckdb_extension"


_LOADER = textwrap.dedent(
    """
    import os, sys, time, duckdb
    from tasks.catalog.extensions import load_extension
    con = duckdb.connect(config={"extension_directory": sys.argv[1],
                                 "autoinstall_known_extensions": False})
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.002)
    print([load_extension(con, e) for e in ("ducklake", "postgres_scanner", "httpfs")])
    """
)


def test_processes_loading_extensions_at_once_on_a_fresh_machine(tmp_path: Path) -> None:
    """Three processes load the extensions at the same moment into empty folders: each
    gets them (copying into DuckDB's extension folder made some load a half-copied file)."""
    env = {**_child_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOADER, str(tmp_path / "ext"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert all(out.strip() == "['package', 'package', 'package']" for out, _ in outs)


# ----------------------------------------------------------------------------- writers

_WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from helpers_catalog import record_metrics, record_stage
    from tasks.catalog import Catalog
    from tasks.catalog.connections import CONFLICT_RETRIES
    who, go = sys.argv[1], sys.argv[2]
    cat = Catalog()  # the environment names the lake
    assert cat.is_lake
    cat.migrate()
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    t0 = time.monotonic()
    for i in range(20):  # 20 write transactions
        k = i % 5
        if k == 0:
            cat.insert_rows("metrics", [
                {"run_id": who, "stage": "pretrain", "step": i, "name": "loss", "value": i / 2}])
        elif k == 1:
            cat.replace_rows("corpus", [{"chars": i, "tokens": 10 * i}],
                             where={"run_id": who, "split": "train"})
        elif k == 2:
            cat.upsert_rows("sources", [{"name": "src-" + who, "bytes": i},
                                        {"name": "shared", "url": who, "bytes": i}], key=["name"])
        elif k == 3:
            record_stage(cat, who, "pretrain", status="completed" if i == 18 else "running",
                         outputs={"i": i})
        else:  # 15 rows: beyond DuckLake's inlining limit, so Parquet files are written
            record_metrics(cat, who, "bulk", [
                {"step": s, "name": "acc", "value": i + s / 100} for s in range(15)],
                replace=True)
    print(json.dumps({"seconds": time.monotonic() - t0, "retries": dict(CONFLICT_RETRIES)}),
          flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_20_transactions_each_lose_nothing(
    lake: CatalogSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_lake(monkeypatch, lake)
    cat = Catalog(settings=lake)
    cat.upsert_rows("sources", [{"name": "shared", "url": "seed", "bytes": -1}], key=["name"])
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, who, str(go)],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("A", "B")
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            assert line == "ready", p.stderr.read() if p.stderr else line
        t0 = time.monotonic()
        go.touch()  # both start writing at the same moment
        outs = [p.communicate(timeout=300) for p in procs]
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    print(f"\n2 x 20 lake transactions: {wall:.1f} s wall, reports {reports}")

    m = cat.query_df("SELECT run_id, stage, step, name, value FROM metrics ORDER BY ALL")
    expected = [(w, "bulk", s, "acc", 19 + s / 100) for w in "AB" for s in range(15)] + [
        (w, "pretrain", i, "loss", i / 2) for w in "AB" for i in (0, 5, 10, 15)
    ]
    expected_df = pd.DataFrame(sorted(expected), columns=list(m.columns))
    pd.testing.assert_frame_equal(m, expected_df, check_dtype=False)
    corpus = cat.query_df("SELECT run_id, split, chars, tokens FROM corpus ORDER BY run_id")
    assert corpus.to_dict("records") == [
        {"run_id": w, "split": "train", "chars": 16, "tokens": 160} for w in "AB"
    ]
    src = cat.query_df("SELECT name, url, bytes FROM sources ORDER BY name")
    assert src["name"].tolist() == ["shared", "src-A", "src-B"]  # one row per key
    assert src["bytes"].tolist() == [17, 17, 17]
    assert src["url"][0] in {"A", "B"}
    st = cat.query_df("SELECT run_id, stage, status, outputs FROM stages ORDER BY run_id")
    assert st[["run_id", "stage", "status"]].values.tolist() == [
        ["A", "pretrain", "completed"],
        ["B", "pretrain", "completed"],
    ]
    assert [json.loads(o) for o in st["outputs"]] == [{"i": 18}, {"i": 18}]
    assert any(f.endswith(".parquet") for f in _data_files(lake))


_MIGRATOR = textwrap.dedent(
    """
    import json, os, sys, time
    from tasks.catalog import Catalog
    from tasks.catalog.connections import CONFLICT_RETRIES
    cat = Catalog()
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.002)
    version = cat.migrate()  # attaches (creating the lake) and migrates, racing the other
    print(json.dumps({"version": version, "retries": dict(CONFLICT_RETRIES)}), flush=True)
    """
)


def _columns(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = 'main' ORDER BY ALL"
    ).fetchall()


@pytest.mark.slow
def test_concurrent_migrations_on_a_fresh_lake(
    lake: CatalogSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_lake(monkeypatch, lake)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATOR, str(go)],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    print(f"\nconcurrent migrations: {reports}")
    assert [r["version"] for r in reports] == [SCHEMA_VERSION, SCHEMA_VERSION]

    con = new_lake_connection(lake, read_only=True)
    try:
        versions = [
            r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        ]
        objects = con.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = 'main'"
        ).fetchall()
        lake_columns = _columns(con)
    finally:
        con.close()
    assert versions == list(range(1, SCHEMA_VERSION + 1))  # each step applied once
    assert {n for n, t in objects if t == "BASE TABLE"} == set(KNOWN_TABLES) | {"schema_version"}
    assert {n for n, t in objects if t == "VIEW"} == set(KNOWN_VIEWS)
    # the lake's tables have exactly the file's columns and types (JSON included)
    file_db = tmp_path / "ref.duckdb"
    Catalog(file_db).migrate()
    ref = duckdb.connect(str(file_db), read_only=True)
    try:
        file_columns = _columns(ref)
    finally:
        ref.close()
    strip_nullable = [c[:3] for c in lake_columns]
    assert strip_nullable == [c[:3] for c in file_columns]


def test_reading_a_lake_nobody_created_yet_says_so(lake: CatalogSettings) -> None:
    with pytest.raises(CatalogError, match="has not been created yet; run the pipeline"):
        Catalog(settings=lake).query_df("SELECT count(*) FROM runs")
    with pytest.raises(CatalogError, match="has not been created yet"):
        run_readonly_sql(None, "SELECT 1", settings=lake)


def test_a_write_losing_a_conflict_is_rerun(
    lake: CatalogSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer commits a DELETE on the same table between our DELETE and COMMIT:
    DuckLake refuses our commit ("Transaction conflict"); the catalog re-runs it."""
    cat = Catalog(settings=lake)
    for run in ("mine", "other"):
        cat.replace_rows("corpus", [{"chars": 1}], where={"run_id": run, "split": "train"})
    other = new_lake_connection(lake, read_only=False)  # a second writer, own DuckDB
    real = catalog_tables.insert_typed
    calls: list[str] = []

    def interfere(con, table, df, cols):
        calls.append(table)
        if len(calls) == 1:
            other.execute("DELETE FROM corpus WHERE run_id = 'other'")
        return real(con, table, df, cols)

    monkeypatch.setattr(catalog_tables, "insert_typed", interfere)
    before = CONFLICT_RETRIES["writing corpus"]
    try:
        assert cat.replace_rows("corpus", [{"chars": 2}], where={"run_id": "mine"}) == 1
    finally:
        other.close()
    assert calls == ["corpus", "corpus"]  # the transaction ran twice
    assert CONFLICT_RETRIES["writing corpus"] - before == 1
    rows = cat.query_df("SELECT run_id, split, chars FROM corpus ORDER BY run_id")
    assert rows.to_dict("records") == [{"run_id": "mine", "split": None, "chars": 2}]


def test_a_write_that_keeps_conflicting_fails_cleanly(
    lake: CatalogSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = Catalog(settings=lake.model_copy(update={"lock_timeout": 1.0}))
    cat.replace_rows("corpus", [{"chars": 1}], where={"run_id": "mine", "split": "train"})
    other = new_lake_connection(lake, read_only=False)
    real = catalog_tables.insert_typed

    def interfere(con, table, df, cols):  # every attempt loses to another writer
        other.execute("INSERT INTO corpus (run_id, chars) VALUES ('tmp', 0)")
        other.execute("DELETE FROM corpus WHERE run_id = 'tmp'")
        return real(con, table, df, cols)

    monkeypatch.setattr(catalog_tables, "insert_typed", interfere)
    try:
        with pytest.raises(CatalogError, match="kept conflicting with other writers") as info:
            cat.replace_rows("corpus", [{"chars": 2}], where={"run_id": "mine", "split": "train"})
    finally:
        other.close()
    assert "nothing of it was written" in str(info.value)
    monkeypatch.undo()
    rows = cat.query_df("SELECT run_id, chars FROM corpus")
    assert rows.to_dict("records") == [{"run_id": "mine", "chars": 1}]


def test_a_migration_losing_a_create_race_is_rerun(
    lake: CatalogSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process migrates while ours is inside its first step: our CREATE TABLE
    fails ("created by another transaction already"); the migration re-runs and finds
    the schema complete."""
    from tasks.catalog import migrate

    real = migrate.migration_step
    raced: list[int] = []

    def racing(step: int, *, lake: bool = False) -> list[str]:
        if not raced:
            raced.append(step)
            assert Catalog(settings=lake_settings).migrate() == SCHEMA_VERSION
        return real(step, lake=lake)

    lake_settings = lake
    monkeypatch.setattr(migrate, "migration_step", racing)
    before = CONFLICT_RETRIES["migrate"]
    assert Catalog(settings=lake).migrate() == SCHEMA_VERSION
    assert raced == [0]
    assert CONFLICT_RETRIES["migrate"] - before >= 1
    versions = Catalog(settings=lake).query_df("SELECT version FROM schema_version ORDER BY 1")
    assert versions["version"].tolist() == list(range(1, SCHEMA_VERSION + 1))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_lake_connection(lake: CatalogSettings) -> None:
    """A child forked after the parent used the lake writes through its own connection;
    the parent's (cached) connection keeps working and sees the child's row."""
    cat = Catalog(settings=lake)
    cat.insert_rows("samples", [{"run_id": "parent", "text": "p"}])
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if its write committed
        code = 1
        try:
            Catalog(settings=lake).insert_rows("samples", [{"run_id": "child", "text": "c"}])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    cat.insert_rows("samples", [{"run_id": "parent2", "text": "q"}])
    got = cat.query_df("SELECT run_id FROM samples ORDER BY run_id")["run_id"].tolist()
    assert got == ["child", "parent", "parent2"]


# ----------------------------------------------------------------------------- sql, views


def _seed(cat: Catalog) -> None:
    """The same rows for the file and the lake: runs, stages, metrics, baselines,
    responses and judgments (the eval views' inputs)."""
    start_run(cat, "r1", profile="smoke", config={"lr": 0.0004, "nested": {"a": [1, 2]}})
    record_stage(cat, "r1", "finetune_spam", status="completed", outputs={"x": "y"})
    record_metrics(
        cat, "r1", "finetune_spam", [{"split": "train", "name": "final_accuracy", "value": 0.3}]
    )
    record_metrics(
        cat,
        "r1",
        "finetune_spam",
        [
            {"step": 1, "split": "test", "name": "final_accuracy", "value": 0.95},
            {"step": 2, "split": "val", "name": "final_accuracy", "value": 0.97},
            {"step": 3, "split": "train", "name": "loss", "value": 0.25},
        ],
        replace=True,
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
    cat.replace_rows(
        "responses",
        [
            {"example_id": i, "instruction": f"i{i}", "output": f"o{i}", "response": f"r{i}"}
            for i in range(8)
        ],
        where={"run_id": "r1"},
    )
    scores = [80, 65, None, 90, 40, None, 100]
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
    cat.end_run("r1", "completed")


_QUERIES = [
    "SELECT * FROM spam_accuracy ORDER BY run_id, split",
    "SELECT * FROM eval_summary ORDER BY run_id, judge_model, prompt_version",
    "SELECT * FROM eval_examples ORDER BY run_id, example_id, judge_model NULLS LAST",
    "SELECT stage, status, outputs->>'x' AS x FROM stages ORDER BY stage",
    "SELECT profile, config->'nested'->'a' AS a, status FROM runs",
    "SELECT step, split, name, value FROM metrics ORDER BY step",
]


@pytest.mark.slow
def test_sql_and_eval_views_on_the_lake_match_the_file(
    lake: CatalogSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    file_db = tmp_path / "same.duckdb"
    _seed(Catalog(file_db))
    _seed(Catalog(settings=lake))
    from_file = [_sql_json([q, "--db", str(file_db)], capsys) for q in _QUERIES]
    _use_lake(monkeypatch, lake)  # no --db: `gptflow sql` follows GPTFLOW_CATALOG_URL
    from_lake = [_sql_json([q], capsys) for q in _QUERIES]
    assert from_lake == from_file
    spam, summary, examples, stages, runs, metrics = from_lake
    assert {r["split"]: r["finetuned"] for r in spam} == {"test": 0.95, "train": None, "val": 0.97}
    llama = next(r for r in summary if r["judge_model"] == "llama3")
    assert (llama["n"], llama["n_scored"], llama["n_failed"], llama["mean_score"]) == (
        7,
        5,
        2,
        75.0,
    )
    assert len(examples) == 9 and examples[-1]["score"] is None  # example 7: LEFT JOIN
    assert stages == [{"stage": "finetune_spam", "status": "completed", "x": "y"}]
    assert json.loads(runs[0]["a"]) == [1, 2]
    assert [r["value"] for r in metrics] == [0.95, 0.97, 0.25]
    # the table format too, and the views through the library's query path
    assert cli_main(["sql", _QUERIES[1]]) == 0
    lake_table = capsys.readouterr().out
    assert cli_main(["sql", _QUERIES[1], "--db", str(file_db)]) == 0
    assert capsys.readouterr().out == lake_table
    from tasks.stages.judge import summarize

    pd.testing.assert_frame_equal(summarize(Catalog(settings=lake)), summarize(Catalog(file_db)))


@pytest.fixture(scope="module")
def seeded_lake(
    postgres_server, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CatalogSettings, tuple]:
    """A lake holding the seed rows (one table in a Parquet file), and its state."""
    db = postgres_server.create_database()
    settings = CatalogSettings(
        url=postgres_server.ducklake_url(db),
        data_path=str(tmp_path_factory.mktemp("seeded") / "data"),
    )
    cat = Catalog(settings=settings)
    _seed(cat)
    cat.replace_rows(
        "spam_examples",
        [{"idx": i, "label": "ham", "text": f"m{i}"} for i in range(50)],  # a Parquet file
        where={"run_id": "r1", "split": "train"},
    )
    return settings, _lake_state(settings)


#: Statements that would write (or reach past the lake); `gptflow sql` must refuse each.
_WRITES = [
    "INSERT INTO metrics (run_id, value) VALUES ('evil', 1)",
    "DELETE FROM metrics",
    "UPDATE metrics SET value = 0",
    "CREATE TABLE evil (a INTEGER)",
    "DROP TABLE metrics",
    "DROP VIEW eval_summary",
    "COPY metrics TO 'out.csv'",
    "COPY metrics TO '{data}main/spam_examples/evil.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{data}exported'",
    f"CALL {LAKE_ALIAS}.set_option('data_inlining_row_limit', 0)",
    f"SELECT * FROM ducklake_expire_snapshots('{LAKE_ALIAS}', older_than => now())",
    f"SELECT * FROM ducklake_flush_inlined_data('{LAKE_ALIAS}')",
    f"SELECT count(*) FROM ducklake_merge_adjacent_files('{LAKE_ALIAS}')",
    f"SELECT * FROM query('SELECT * FROM ducklake_flush_inlined_data(''{LAKE_ALIAS}'')')",
    f"SELECT * FROM postgres_execute('__ducklake_metadata_{LAKE_ALIAS}', 'CREATE TABLE x (a INT)')",
    "SELECT * FROM runs WHERE run_id IN (SELECT 'x' FROM ducklake_rewrite_data_files('{alias}'))",
    "ATTACH ':memory:' AS scratch",
    "SET enable_external_access = true",
    "SELECT 1; DELETE FROM metrics",
    "CREATE TABLE memory.main.t AS SELECT 1 AS a",
    "PRAGMA enable_profiling",
]


def test_sql_refuses_writes_on_the_lake(
    seeded_lake: tuple[CatalogSettings, tuple],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings, baseline = seeded_lake
    monkeypatch.chdir(tmp_path)
    _use_lake(monkeypatch, settings)
    for stmt in _WRITES:
        stmt = stmt.format(data=settings.data_path, alias=LAKE_ALIAS)
        assert cli_main(["sql", stmt]) == 1, stmt
        err = capsys.readouterr().err
        assert "gptflow sql: error: the catalog is opened read-only by `gptflow sql`" in err, (
            stmt,
            err,
        )
    # the data files, the latest snapshot and every table's rows are as they were
    _assert_same_state(_lake_state(settings), baseline)
    assert not Path("out.csv").exists()


def test_sql_reads_the_lake(
    seeded_lake: tuple[CatalogSettings, tuple],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_lake(monkeypatch, seeded_lake[0])
    assert _sql_json(["SELECT count(*) AS n, sum(idx) AS s FROM spam_examples"], capsys) == [
        {"n": 50, "s": 1225}
    ]
    tables = {r["name"] for r in _sql_json(["SHOW TABLES"], capsys)}
    assert set(KNOWN_TABLES) | set(KNOWN_VIEWS) <= tables
    snaps = _sql_json([f"SELECT count(*) AS n FROM ducklake_snapshots('{LAKE_ALIAS}')"], capsys)
    assert snaps[0]["n"] >= 1  # DuckLake's read-only functions stay available
    info = _sql_json(["PRAGMA table_info('runs')"], capsys)  # rewritten to a SELECT: allowed
    assert {r["name"]: r["type"] for r in info}["config"] == "JSON"
    described = _sql_json(["DESCRIBE runs"], capsys)
    assert {r["column_name"]: r["column_type"] for r in described}["config"] == "JSON"
    with pytest.raises(CatalogError, match="Permission"):  # outside data_path: no file access
        run_readonly_sql(None, "SELECT * FROM read_text('/etc/hostname')")


# ----------------------------------------------------------------------------- bulk, S3


@pytest.mark.slow
def test_bulk_ingestion_on_the_lake(lake: CatalogSettings) -> None:
    cat = Catalog(settings=lake)
    for size in (6000, 4000):  # a fresh load, then a full replacement
        t0 = time.monotonic()
        n = cat.replace_many(
            [
                (
                    "spam_examples",
                    [{"idx": i, "label": "spam" if i % 7 else "ham", "text": f"t{i}"}
                     for i in range(size)],
                    {"run_id": "r", "split": "train"},
                ),
                (
                    "instructions",
                    [{"idx": i, "instruction": f"do {i}", "input": "", "output": f"o{i}"}
                     for i in range(size // 2)],
                    {"run_id": "r", "split": "train"},
                ),
                (
                    "metrics",
                    pd.DataFrame({"step": range(size), "name": "loss", "value": 0.5}),
                    {"run_id": "r", "stage": "pretrain"},
                ),
            ]
        )  # fmt: skip
        print(f"\nreplace_many of {n} rows on the lake: {time.monotonic() - t0:.2f} s")
        assert n == size + size // 2 + size
        got = cat.query_df(
            "SELECT (SELECT count(*) FROM spam_examples) AS s, "
            "(SELECT sum(idx) FROM spam_examples) AS si, "
            "(SELECT count(*) FROM spam_examples WHERE label = 'ham') AS ham, "
            "(SELECT count(*) FROM instructions) AS i, "
            "(SELECT count(*) FROM metrics) AS m, (SELECT sum(value) FROM metrics) AS mv"
        ).iloc[0]
        assert got.tolist() == [
            size,
            size * (size - 1) // 2,
            len(range(0, size, 7)),
            size // 2,
            size,
            0.5 * size,
        ]
    assert any(f.endswith(".parquet") for f in _data_files(lake))


@pytest.mark.slow
def test_lake_with_data_on_s3(
    postgres_server,
    s3_server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    prefix = f"lake-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(
        "GPTFLOW_CATALOG_URL", postgres_server.ducklake_url(postgres_server.create_database())
    )
    monkeypatch.setenv("GPTFLOW_CATALOG_DATA_PATH", f"s3://{s3_server.bucket}/{prefix}")
    monkeypatch.setenv("GPTFLOW_CATALOG_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("GPTFLOW_CATALOG_S3_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("GPTFLOW_CATALOG_S3_SECRET", s3_server.secret)
    cat = Catalog()
    assert cat.settings.on_s3 and cat.settings.s3.url_style == "path"
    cat.replace_many(
        [
            (
                "spam_examples",
                [{"idx": i, "label": "ham", "text": f"t{i}"} for i in range(500)],
                {"run_id": "r", "split": "train"},
            ),
            ("corpus", [{"chars": 20479, "tokens": 5145}], {"run_id": "r", "split": "train"}),
        ]
    )
    _seed(cat)
    keys = s3_server.keys(prefix + "/")
    assert any(k.endswith(".parquet") for k in keys), keys
    assert _sql_json(["SELECT count(*) AS n, sum(idx) AS s FROM spam_examples"], capsys) == [
        {"n": 500, "s": 124750}
    ]
    summary = _sql_json(["SELECT n, mean_score FROM eval_summary ORDER BY judge_model"], capsys)
    assert summary == [{"n": 7, "mean_score": 75.0}, {"n": 1, "mean_score": 10.0}]
    for stmt in (
        "DELETE FROM spam_examples",
        f"COPY spam_examples TO 's3://{s3_server.bucket}/{prefix}/main/evil.parquet'",
    ):
        assert cli_main(["sql", stmt]) == 1
        assert "opened read-only" in capsys.readouterr().err
    assert s3_server.keys(prefix + "/") == keys
    assert list(tmp_path.iterdir()) == []  # nothing landed on local disk
