"""The DuckDB catalog under concurrent writers and writes that fail half-way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
from _rel_helpers import PYTHON

from gpt.errors import CatalogError

_WRITER = """
import sys, time
from tasks.catalog import Catalog
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cat = Catalog(db, lock_timeout=60)
cat.migrate()
print("ready", flush=True)
while not __import__("os").path.exists(db + ".go"):
    time.sleep(0.01)
for i in range(n):
    cat.record_metrics(who, "pretrain", [
        {"step": i, "epoch": 1, "seen": i, "split": s, "name": "loss", "value": i + 0.5}
        for s in ("train", "val")
    ])
    if i % 5 == 0:
        cat.record_stage(who, "pretrain", status="running", outputs={"i": i})
cat.record_stage(who, "pretrain", status="completed", outputs={"n": n})
print("done", flush=True)
"""


def test_two_processes_writing_at_once_lose_no_rows(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    from tasks.catalog import Catalog

    db = tmp_path / "shared.duckdb"
    Catalog(db).migrate()
    n = 15
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", _WRITER, str(db), who, str(n)],
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for who in ("A", "B")
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        Path(str(db) + ".go").touch()  # both start writing at the same moment
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    cat = Catalog(db)
    m = cat.query_df("SELECT run_id, step, split FROM metrics ORDER BY run_id, step, split")
    expected = pd.DataFrame(
        [(who, i, s) for who in ("A", "B") for i in range(n) for s in ("train", "val")],
        columns=["run_id", "step", "split"],
    )
    pd.testing.assert_frame_equal(m.reset_index(drop=True), expected, check_dtype=False)
    st = cat.query_df("SELECT run_id, status, outputs FROM stages ORDER BY run_id")
    assert st["status"].tolist() == ["completed", "completed"]
    # the file is sound: DuckDB's own check and a full read of every table succeed
    from tasks.catalog.schema import KNOWN_TABLES

    for table in sorted(KNOWN_TABLES):
        cat.query_df(f"SELECT * FROM {table}")


@pytest.fixture
def catalog_with_run1():
    from tasks.catalog import Catalog

    cat = Catalog()
    rows = [
        {"step": i, "epoch": 1, "seen": 64 * i, "split": "train", "name": "loss", "value": 10.0 - i}
        for i in range(20)
    ]
    cat.record_metrics("run1", "pretrain", rows)
    cat.replace_rows(
        "sms_messages",
        [{"line_no": i, "label": "ham", "text": f"m{i}"} for i in range(50)],
        where={"source_sha256": "abc"},
    )
    return cat


def _snapshot(cat, table: str) -> pd.DataFrame:
    return cat.query_df(f"SELECT * FROM {table} ORDER BY ALL").reset_index(drop=True)


def test_replace_failing_after_the_delete_rolls_back(catalog_with_run1) -> None:
    """A bad value half-way through the new rows fails the INSERT after the DELETE ran:
    the transaction is rolled back and the earlier rows are all there."""
    cat = catalog_with_run1
    before = _snapshot(cat, "metrics")
    bad = [{"step": i, "split": "train", "name": "loss", "value": 1.0} for i in range(30)]
    bad[15]["value"] = "not a number"
    with pytest.raises(CatalogError) as info:
        cat.record_metrics("run1", "pretrain", bad, replace=True)
    assert "rolled back" in str(info.value) and "metrics" in str(info.value)
    pd.testing.assert_frame_equal(_snapshot(cat, "metrics"), before)


def test_rows_generator_failing_midway_writes_nothing(catalog_with_run1) -> None:
    cat = catalog_with_run1
    before = _snapshot(cat, "sms_messages")

    def rows():
        for i in range(100):
            if i == 60:
                raise OSError("disk read failed while producing rows")
            yield {"line_no": i, "label": "spam", "text": f"new{i}"}

    with pytest.raises(OSError):
        cat.replace_rows("sms_messages", rows(), where={"source_sha256": "abc"})
    pd.testing.assert_frame_equal(_snapshot(cat, "sms_messages"), before)


def test_process_killed_inside_a_write_transaction(tmp_path: Path, sub_env: dict[str, str]) -> None:
    """SIGKILL between DELETE and COMMIT: the next open sees the earlier rows."""
    from tasks.catalog import Catalog

    db = tmp_path / "k.duckdb"
    cat = Catalog(db)
    cat.record_metrics(
        "run1",
        "pretrain",
        [{"step": i, "split": "train", "name": "loss", "value": float(i)} for i in range(10)],
    )
    before = _snapshot(cat, "metrics")
    child = f"""
import os, signal
from tasks.catalog import Catalog
cat = Catalog({str(db)!r})
with cat.connect() as con:
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM metrics WHERE run_id = 'run1'")
    con.execute("INSERT INTO metrics (run_id, step) VALUES ('run1', 999)")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([PYTHON, "-c", child], env=sub_env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    pd.testing.assert_frame_equal(_snapshot(Catalog(db), "metrics"), before)


def test_tokenize_stage_failing_leaves_earlier_rows(
    mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1 tokenizes; run 2 (same stage, bad instruction file, then a failure inside
    the catalog writes) fails: run 1's dataset rows are untouched, run 2 is recorded
    failed, and its failed attempt is not cached."""
    import shutil

    from flows.config import build_config
    from tasks.catalog import Catalog
    from tasks.stages.contract import RunContext, StageOutput
    from tasks.stages.download import DownloadOut, SourceOut
    from tasks.stages.runner import run_stage

    cfg = build_config("smoke")
    data = tmp_path / "inputs"
    data.mkdir()
    for name in ("the-verdict.txt", "instruction-data.json"):
        shutil.copy(mirror / name, data / name)
    shutil.copytree(mirror / "gpt2", tmp_path / "gpt2")
    sms = tmp_path / "sms" / "SMSSpamCollection"
    sms.parent.mkdir()
    import zipfile

    with zipfile.ZipFile(mirror / "sms+spam+collection.zip") as zf:
        sms.write_bytes(zf.read("SMSSpamCollection"))

    def src(path: str, folder: str, sha: str) -> SourceOut:
        return SourceOut(path=path, folder=folder, sha256=[sha])

    out = DownloadOut(
        sources={
            "the-verdict": src("inputs/the-verdict.txt", "inputs", "t"),
            "sms-spam": src("sms/SMSSpamCollection", "sms", "s"),
            "instruction-data": src("inputs/instruction-data.json", "inputs", "i"),
            "gpt2-tokenizer": src("gpt2/encoder.json", "gpt2", "g"),
        }
    )

    def dl(digest: str) -> StageOutput:
        return StageOutput("download", "", str(tmp_path), "dl", digest=digest, out=out)

    def ctx(run_id: str) -> RunContext:
        return RunContext(
            run_id=run_id,
            catalog_settings=Catalog().settings,
            artifacts=str(tmp_path / "artifacts"),
            datasets=str(data),
            progress=False,
        )

    run_stage(ctx("run1"), "tokenize", cfg.tokenize, download=dl("d1"))
    cat = Catalog()
    tables = ["sms_messages", "spam_examples", "instructions", "corpus"]
    before = {t: _snapshot(cat, t) for t in tables}
    assert all(len(df) for df in before.values())

    # (a) a malformed instruction file: the parse fails before any write
    (data / "instruction-data.json").write_text('[{"instruction": "x", "input": 1}]')
    with pytest.raises(Exception) as info:
        run_stage(ctx("run2"), "tokenize", cfg.tokenize, download=dl("d2"))
    assert "record 0" in str(info.value)
    # (b) valid input, but a catalog write fails half-way through the stage's tables
    # (corpus is written, then instructions fails)
    shutil.copy(mirror / "instruction-data.json", data / "instruction-data.json")
    from tasks.catalog import tables as catalog_tables

    real = catalog_tables.delete_where

    def failing(con, table, where, cols):
        if table == "instructions":
            raise CatalogError("simulated disk error while writing 'instructions'")
        return real(con, table, where, cols)

    monkeypatch.setattr(catalog_tables, "delete_where", failing)
    with pytest.raises(CatalogError):
        run_stage(ctx("run3"), "tokenize", cfg.tokenize, download=dl("d3"))
    monkeypatch.undo()

    after = {t: _snapshot(cat, t) for t in tables}
    for t in tables:
        run1_before = before[t][
            before[t].get("run_id", pd.Series(["run1"] * len(before[t]))) == "run1"
        ]
        run1_after = after[t][after[t].get("run_id", pd.Series(["run1"] * len(after[t]))) == "run1"]
        pd.testing.assert_frame_equal(
            run1_after.reset_index(drop=True), run1_before.reset_index(drop=True), obj=t
        )
    # the four dataset tables are written in one transaction: run3 left nothing behind
    for t in ("spam_examples", "instructions", "corpus"):
        assert (after[t]["run_id"] == "run3").sum() == 0, t
    st = cat.query_df("SELECT run_id, status, message FROM stages ORDER BY run_id")
    assert st["status"].tolist() == ["completed", "failed", "failed"]
    assert "record 0" in st["message"][1] and "instructions" in st["message"][2]
    # nothing of the failed attempts is served from the cache later
    stages_dir = tmp_path / "artifacts" / "stages" / "tokenize"
    assert len([p for p in stages_dir.iterdir() if not p.name.endswith(".partial")]) == 1
