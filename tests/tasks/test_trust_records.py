"""Trust records that last (point 3 of issue 17).

A file without a published sha256 is held to the digest of its first verified download.
That record lived only in the catalog's ``sources`` table, an upsert: a fresh or rebuilt
catalog had none, so the next download of a changed file was trusted again, and
``gptflow catalog rebuild --replace --artifacts /typo`` replaced the catalog with one
holding no runs and no sources. Now the record also lives beside the file (its download
record) and in the run records; a changed file is refused until ``--retrust NAME``; a
rebuild restores ``sources`` and refuses missing artifacts, artifacts without runs and a
result emptier than the catalog it replaces.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flows.cli import main
from gpt.data.download import download_sources
from gpt.data.sources import Source, SourceFile
from gpt.errors import ChecksumError, ConfigError
from tasks.catalog import Catalog
from tasks.catalog.settings import CatalogSettings
from tasks.stages.contract import RunContext

FAST = {"retries": 1, "backoff": 0.01, "timeout": 2.0, "progress": False}
REL = "gpt2/355M/model.ckpt.index"


def _tofu(mirror: Path, content: bytes) -> Source:
    """A release whose weight files have no published sha256 (``REL`` holds
    ``content``), served from a local mirror folder."""
    (mirror / REL).parent.mkdir(parents=True, exist_ok=True)
    (mirror / REL).write_bytes(content)
    (mirror / "gpt2/355M/checkpoint").write_bytes(b"checkpoint")
    files = (REL, "gpt2/355M/checkpoint")
    return Source(
        "gpt2-test", "t", tuple(SourceFile(f, ("https://invalid.example/x",)) for f in files)
    )


def test_a_fresh_catalog_still_refuses_a_changed_download(tmp_path: Path) -> None:
    """The catalog's record is gone (``trusted`` empty, as from a new catalog): the record
    beside the file still holds the download to the first digest."""
    mirror, dest = tmp_path / "mirror", tmp_path / "datasets"
    src = _tofu(mirror, b"index v1" * 50)
    first = download_sources([src], dest, mirror=mirror, **FAST)[0].files[0]
    (mirror / REL).write_bytes(b"index v2" * 50)  # upstream changed: same size, other bytes
    with pytest.raises(ChecksumError, match="--retrust gpt2-test") as err:
        download_sources([src], dest, mirror=mirror, trusted={}, refresh=True, **FAST)
    assert first.sha256 in str(err.value)
    assert (dest / REL).read_bytes() == b"index v1" * 50  # the verified copy is kept
    (dest / REL).unlink()  # the local copy lost as well: still refused
    with pytest.raises(ChecksumError, match="trust on first use"):
        download_sources([src], dest, mirror=mirror, trusted={}, **FAST)
    assert not (dest / REL).exists()


def test_retrust_accepts_the_changed_file_and_records_it(tmp_path: Path) -> None:
    mirror, dest = tmp_path / "mirror", tmp_path / "datasets"
    src = _tofu(mirror, b"index v1" * 50)
    download_sources([src], dest, mirror=mirror, **FAST)
    (mirror / REL).write_bytes(b"index v2" * 50)
    res = download_sources([src], dest, mirror=mirror, retrust=["gpt2-test"], **FAST)[0]
    assert not res.skipped and (dest / REL).read_bytes() == b"index v2" * 50
    record = json.loads((dest / "gpt2/355M/.model.ckpt.index.download.json").read_text())
    assert record["sha256"] == res.sha256  # the new digest is the record now
    again = download_sources([src], dest, mirror=mirror, trusted={}, refresh=True, **FAST)[0]
    assert again.sha256 == res.sha256  # held to the new one
    # a file's own name (as the catalog names it, or its path) works as well
    for name in (f"gpt2-test:{REL}", REL):
        download_sources([src], dest, mirror=mirror, retrust=[name], **FAST)


def test_a_file_changed_in_the_datasets_folder_is_refused_until_retrusted(tmp_path: Path) -> None:
    """Replaced in place (same size, other bytes): neither used nor fetched over."""
    mirror, dest = tmp_path / "mirror", tmp_path / "datasets"
    src = _tofu(mirror, b"index v1" * 50)
    download_sources([src], dest, mirror=mirror, **FAST)
    (dest / REL).write_bytes(b"index v3" * 50)
    with pytest.raises(ChecksumError, match="changed since its verified download") as err:
        download_sources([src], dest, mirror=mirror, **FAST)
    assert "\n" not in str(err.value) and "--retrust gpt2-test" in str(err.value)
    assert (dest / REL).read_bytes() == b"index v3" * 50
    res = download_sources([src], dest, mirror=mirror, retrust=["gpt2-test"], **FAST)[0]
    assert res.files[0].sha256 == hashlib.sha256(b"index v3" * 50).hexdigest()
    assert download_sources([src], dest, mirror=mirror, **FAST)[0].skipped  # trusted now


def test_records_that_disagree_are_refused(tmp_path: Path) -> None:
    """The catalog says one digest, the record beside the file another: nothing is
    guessed."""
    mirror, dest = tmp_path / "mirror", tmp_path / "datasets"
    src = _tofu(mirror, b"index v1" * 50)
    first = download_sources([src], dest, mirror=mirror, **FAST)[0].files[0]
    other = {REL: ("ab" * 32, first.bytes)}
    with pytest.raises(ChecksumError, match="records disagree") as err:
        download_sources([src], dest, mirror=mirror, trusted=other, **FAST)
    msg = str(err.value)
    assert "\n" not in msg and "--retrust gpt2-test" in msg and first.sha256[:16] in msg


def test_retrust_names_are_checked(tmp_path: Path) -> None:
    from gpt.data.trust import retrust_paths

    assert REL in retrust_paths(["gpt2-355M"])
    assert retrust_paths([f"gpt2-355M:{REL}"]) == {REL}
    with pytest.raises(ConfigError, match="no such source"):
        retrust_paths(["gpt2-typo"])
    with pytest.raises(ConfigError, match="published sha256"):
        retrust_paths(["gpt2-124M"])  # every file pinned
    from flows.config import build_config
    from flows.run_start import make_context

    with pytest.raises(ConfigError, match="--retrust gpt2-typo"):
        make_context(build_config("smoke"), "r", retrust=["gpt2-typo"])


# --------------------------------------------------------------------------- the CLI


def _download(mirror: Path, db: Path, dest: Path, *extra: str) -> int:
    return main(["download", "--only", "gpt2-1558M", "--mirror", str(mirror), "--db", str(db),
                 "--dest", str(dest), "--no-progress", *extra])  # fmt: skip


def test_cli_refuses_a_changed_file_with_a_fresh_catalog_until_retrusted(
    release_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, dest = tmp_path / "c.duckdb", tmp_path / "datasets"
    assert _download(release_mirror, db, dest) == 0
    index = "gpt2/1558M/model.ckpt.index"
    first = Catalog(db).source_digests()[index]
    db.unlink()  # a fresh catalog
    (release_mirror / index).write_bytes(b"model.ckpt.index v2")
    (dest / index).unlink()
    capsys.readouterr()
    assert _download(release_mirror, db, dest) == 1
    err = capsys.readouterr().err
    assert "--retrust gpt2-1558M" in err and first[0] in err
    assert not (dest / index).exists()
    assert _download(release_mirror, db, dest, "--retrust", "gpt2-1558M") == 0
    new = Catalog(db).source_digests()[index]
    assert new[0] != first[0] and (dest / index).read_bytes() == b"model.ckpt.index v2"
    assert _download(release_mirror, db, dest, "--retrust", "gpt2-124M") == 1  # all pinned
    assert "published sha256" in capsys.readouterr().err


# --------------------------------------------------------------------------- run records


def _ctx(root: Path, run_id: str, mirror: Path, **kw) -> RunContext:
    return RunContext(
        run_id=run_id,
        catalog_settings=CatalogSettings(path=root / "catalog.duckdb"),
        artifacts=str(root / "artifacts"),
        datasets=str(root / "datasets"),
        mirror=str(mirror),
        progress=False,
        **kw,
    )


def _records_run(root: Path, mirror: Path, run_id: str, content: bytes, **kw) -> str:
    """A run that downloads the stand-in weight file; returns its sha256."""
    from tasks.stages.download import fetch_sources

    src = _tofu(mirror, content)
    ctx = _ctx(root, run_id, mirror, **kw)
    ctx.recorder.start_run(run_id, flow_run_id=None, profile="t", config={}, git_rev=None)
    (res,) = fetch_sources(ctx, [src])  # type: ignore[list-item]
    ctx.recorder.end_run(run_id, "completed")
    return res.sha256


def test_run_records_keep_the_digests_and_rebuild_restores_sources(tmp_path: Path) -> None:
    root, mirror = tmp_path / "w", tmp_path / "mirror"
    sha = _records_run(root, mirror, "run-1", b"index v1" * 50)
    record = json.loads((root / "artifacts" / "runs" / "run-1.json").read_text())
    assert record["sources"][f"gpt2-test:{REL}"]["sha256"] == sha

    # the catalog and the datasets folder are lost; the artifacts are not
    (root / "catalog.duckdb").unlink()
    (root / "datasets" / REL).unlink()
    (root / "datasets" / "gpt2/355M/.model.ckpt.index.download.json").unlink()
    assert main(["catalog", "rebuild", "--artifacts", str(root / "artifacts")]) == 0
    rebuilt = Catalog(os.environ["GPTFLOW_DB"])
    assert rebuilt.source_digests()[REL] == (sha, 400)
    # so the next download of a changed file is refused
    (mirror / REL).write_bytes(b"index v2" * 50)
    src = _tofu(mirror, b"index v2" * 50)
    with pytest.raises(ChecksumError, match="--retrust"):
        download_sources([src], root / "datasets", mirror=mirror,
                         trusted=rebuilt.source_digests(), **FAST)  # fmt: skip


def test_rebuild_keeps_the_newest_record_of_each_file(tmp_path: Path) -> None:
    """A later retrust (run 2) wins over the first record (run 1), whatever the order the
    records are replayed in, and over an older row already in the catalog."""
    root, mirror = tmp_path / "w", tmp_path / "mirror"
    _records_run(root, mirror, "run-1", b"index v1" * 50)
    new = _records_run(root, mirror, "run-2", b"index v2" * 50, retrust=("gpt2-test",))
    db = tmp_path / "rebuilt.duckdb"
    assert (
        main(["catalog", "rebuild", "--db", str(db), "--artifacts", str(root / "artifacts")]) == 0
    )
    assert Catalog(db).source_digests()[REL][0] == new


# --------------------------------------------------------------------------- refusals


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _filled_catalog(tmp_path: Path) -> tuple[Path, Path]:
    """A catalog with two runs and a download record of its own (not in any run record),
    and the artifacts the runs wrote."""
    root, mirror = tmp_path / "w", tmp_path / "mirror"
    _records_run(root, mirror, "run-1", b"index v1" * 50)
    _records_run(root, mirror, "run-2", b"index v1" * 50)
    Catalog(root / "catalog.duckdb").record_source("cli-only", "u", "cd" * 32, 7)
    return root / "catalog.duckdb", root / "artifacts"


def _counts(db: Path) -> tuple[int, int]:
    cat = Catalog(db)
    return (
        int(cat.query_df("SELECT count(*) AS n FROM runs").n[0]),
        int(cat.query_df("SELECT count(*) AS n FROM sources").n[0]),
    )


def test_rebuild_refuses_artifacts_that_are_missing(tmp_path: Path, capsys) -> None:
    db, _ = _filled_catalog(tmp_path)
    before = _counts(db)
    typo = tmp_path / "typo"
    assert main(["catalog", "rebuild", "--replace", "--db", str(db), "--artifacts", str(typo)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(typo) in line and "does not exist" in line
    assert _counts(db) == before
    args = ["catalog", "rebuild", "--replace", "--allow-empty", "--db", str(db)]
    assert main([*args, "--artifacts", str(typo)]) == 1  # never, even with --allow-empty
    assert _counts(db) == before


def test_rebuild_refuses_artifacts_without_runs(tmp_path: Path, capsys) -> None:
    db, _ = _filled_catalog(tmp_path)
    before = _counts(db)
    empty = tmp_path / "empty-artifacts"
    empty.mkdir()
    assert (
        main(["catalog", "rebuild", "--replace", "--db", str(db), "--artifacts", str(empty)]) == 1
    )
    line = _one_error_line(capsys.readouterr().err)
    assert "no run records" in line and "--allow-empty" in line
    assert _counts(db) == before
    new = tmp_path / "new.duckdb"  # an empty catalog on purpose
    assert main(["catalog", "rebuild", "--allow-empty", "--db", str(new), "--artifacts",
                 str(empty)]) == 0  # fmt: skip
    assert _counts(new) == (0, 0)


def test_rebuild_never_replaces_a_catalog_with_an_emptier_one(tmp_path: Path, capsys) -> None:
    db, artifacts = _filled_catalog(tmp_path)
    (artifacts / "runs" / "run-2.json").unlink()  # one run's record is lost
    before = _counts(db)
    args = ["catalog", "rebuild", "--replace", "--db", str(db), "--artifacts", str(artifacts)]
    assert main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "runs 2 -> 1" in line and "--replace --allow-empty" in line
    assert _counts(db) == before
    assert main([*args, "--allow-empty"]) == 0
    assert _counts(db)[0] == 1
    # the catalog's own download records are carried over into the rebuilt file
    names = set(Catalog(db).query_df("SELECT name FROM sources").name)
    assert {"cli-only", f"gpt2-test:{REL}"} <= names


def test_rebuild_replace_carries_sources_and_benchmarks_over(tmp_path: Path) -> None:
    db, artifacts = _filled_catalog(tmp_path)
    Catalog(db).insert_rows("benchmarks", [{"name": "kept", "ratio": 2.0, "unit": "x"}])
    assert main(["catalog", "rebuild", "--replace", "--db", str(db), "--artifacts",
                 str(artifacts)]) == 0  # fmt: skip
    after = Catalog(db)
    assert "cli-only" in set(after.query_df("SELECT name FROM sources").name)
    kept = after.query_df("SELECT ratio FROM benchmarks WHERE name = 'kept'")
    assert kept.ratio.tolist() == [2.0]
