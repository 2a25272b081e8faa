"""Keys include the environment that shapes outputs (point 6 of issue 17).

Upgrading scikit-learn, torch or tiktoken, or accepting a new GPT-2 weight file into
``datasets/``, left every stage key unchanged. A key now also holds the versions of the
third-party packages the stage's library code imports (derived from its import closure)
and the sha256 of the files it reads from the datasets folder; ``gptflow runs RUN`` says
which part of the key changed when a stage recomputed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from _paths import REPO

import tasks.store.fingerprint as fingerprint
from flows.cli import main
from flows.config import build_config
from gpt.args import LoadGPT2Args
from gpt.errors import ChecksumError
from tasks.catalog.settings import CatalogSettings
from tasks.stages.contract import RunContext, StageOutput
from tasks.stages.runner import key_parts, load_spec, run_stage
from tasks.store.fingerprint import package_versions
from tasks.store.keys import KeyParts, key_changes


def _ctx(root: Path, run_id: str, **kw: Any) -> RunContext:
    return RunContext(
        run_id=run_id,
        catalog_settings=CatalogSettings(path=root / "catalog.duckdb"),
        artifacts=str(root / "artifacts"),
        datasets=str(root / "datasets"),
        progress=False,
        device="cpu",
        **kw,
    )


def _fake(stage: str) -> StageOutput:
    return StageOutput(stage=stage, key="k", root="/nowhere", run_id="r", digest=f"{stage}-d")


def _fake_version(monkeypatch: pytest.MonkeyPatch, dist: str, version: str) -> None:
    real = fingerprint.distribution_version
    monkeypatch.setattr(
        fingerprint, "distribution_version", lambda d: version if d == dist else real(d)
    )


# --------------------------------------------------------------------------- packages


def test_package_versions_follow_what_the_library_imports() -> None:
    base = package_versions("tasks.stages.baseline_spam")
    assert "scikit-learn" in base and "torch" in base
    assert "tiktoken" not in base  # the baselines' vectorisers tokenize; GPT-2's BPE does not
    assert "tiktoken" in package_versions("tasks.stages.finetune_spam")
    judge = package_versions("tasks.stages.judge")
    assert "ollama" in judge and "scikit-learn" not in judge
    for stage in ("tokenize", "pretrain", "finetune_spam", "judge"):
        found = package_versions(f"tasks.stages.{stage}")
        # the orchestration the tasks wrappers import does not shape a result
        assert not {"prefect", "duckdb", "fsspec"} & set(found), (stage, found)
        assert all(v is None or "+" not in v for v in found.values())  # no build variant


def test_package_versions_are_derived_not_listed(tmp_path: Path) -> None:
    """A new import in a library module of the judge's closure adds its package."""
    for pkg in ("gpt", "tasks"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert "scikit-learn" not in package_versions("tasks.stages.judge", tmp_path)
    judge_lib = tmp_path / "gpt" / "eval" / "judge" / "settings.py"
    judge_lib.write_text(judge_lib.read_text() + "\n\ndef _f():\n    import sklearn.utils\n")
    assert "scikit-learn" in package_versions("tasks.stages.judge", tmp_path)


@pytest.mark.parametrize(
    ("dist", "changed", "same"),
    [
        ("scikit-learn", ["baseline_spam", "finetune_spam"], ["pretrain", "judge"]),
        ("torch", ["pretrain", "baseline_spam", "judge"], []),
        ("tiktoken", ["tokenize", "pretrain"], ["judge"]),
    ],
)
def test_a_package_upgrade_changes_the_keys_of_the_stages_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dist: str, changed: list, same: list
) -> None:
    cfg = build_config("smoke")
    ctx = _ctx(tmp_path, "r")

    def keys() -> dict[str, str]:
        out = {}
        for name in changed + same:
            spec = load_spec(name)
            inputs = {i: _fake(i) for i in spec.inputs}
            out[name] = key_parts(spec, getattr(cfg, name), inputs, ctx).key
        return out

    before = keys()
    _fake_version(monkeypatch, dist, "999.0")
    after = keys()
    for name in changed:
        assert after[name] != before[name], f"upgrading {dist} left the key of {name}"
    for name in same:
        assert after[name] == before[name], f"upgrading {dist} changed the key of {name}"


# --------------------------------------------------------------------------- input files


def test_an_accepted_new_weight_file_changes_the_load_gpt2_key(
    tmp_path: Path, release_mirror: Path
) -> None:
    args = LoadGPT2Args(base_model="gpt2", spam_size="1558M", instruct_size="1558M")
    spec = load_spec("load_gpt2")
    inputs = {"tokenize": _fake("tokenize"), "pretrain": None}
    root = tmp_path / "w"
    first = key_parts(spec, args, inputs, _ctx(root, "r1", mirror=str(release_mirror)))
    index = "gpt2/1558M/model.ckpt.index"
    assert index in first.files and (root / "datasets" / index).exists()  # first use: fetched

    # known from the trust records now: computing the key downloads and hashes nothing
    import gpt.data.download
    import gpt.data.transfer
    import gpt.data.trust

    hidden = release_mirror.rename(tmp_path / "away")
    with pytest.MonkeyPatch.context() as mp:
        for module in (gpt.data.download, gpt.data.transfer, gpt.data.trust):
            mp.setattr(module, "sha256_file", lambda p: pytest.fail(f"{p} was hashed"))
        assert key_parts(spec, args, inputs, _ctx(root, "r2", mirror=str(hidden))).key == first.key
    hidden.rename(release_mirror)

    # upstream replaces the file: still held to the trusted one until it is accepted
    (release_mirror / index).write_bytes(b"model.ckpt.index v2")
    assert (
        key_parts(spec, args, inputs, _ctx(root, "r3", mirror=str(release_mirror))).key == first.key
    )
    ctx = _ctx(root, "r4", mirror=str(release_mirror), retrust=("gpt2-1558M",))
    accepted = key_parts(spec, args, inputs, ctx)
    assert accepted.key != first.key and accepted.files[index] != first.files[index]
    assert (root / "datasets" / index).read_bytes() == b"model.ckpt.index v2"
    assert key_changes(first.summary(), accepted.summary()) == [f"input files ({index})"]


def test_a_weight_file_replaced_in_datasets_is_refused_or_changes_the_key(
    tmp_path: Path, release_mirror: Path
) -> None:
    """A weight file replaced in the datasets folder is never keyed (nor used) silently:
    the key computation refuses it; accepted with --retrust, its digest is in the key."""
    import hashlib

    args = LoadGPT2Args(base_model="gpt2", spam_size="1558M", instruct_size="1558M")
    spec = load_spec("load_gpt2")
    inputs = {"tokenize": _fake("tokenize"), "pretrain": None}
    root = tmp_path / "w"
    first = key_parts(spec, args, inputs, _ctx(root, "r1", mirror=str(release_mirror)))
    data = "gpt2/1558M/model.ckpt.data-00000-of-00001"
    (root / "datasets" / data).write_bytes(b"other weights, same release")
    with pytest.raises(ChecksumError, match="--retrust gpt2-1558M"):
        key_parts(spec, args, inputs, _ctx(root, "r2", mirror=str(release_mirror)))
    ctx = _ctx(root, "r3", mirror=str(release_mirror), retrust=("gpt2-1558M",))
    accepted = key_parts(spec, args, inputs, ctx)
    assert accepted.key != first.key
    assert accepted.files[data] == hashlib.sha256(b"other weights, same release").hexdigest()
    assert (
        key_parts(spec, args, inputs, _ctx(root, "r4", mirror=str(release_mirror))).key
        == accepted.key
    )


def test_a_fresh_datasets_folder_is_refused_a_changed_weight_file(
    tmp_path: Path, release_mirror: Path
) -> None:
    """The catalog keeps the record: with the datasets folder gone, the changed file is
    refused when the stage downloads it, and the stage says so."""
    args = LoadGPT2Args(base_model="gpt2", spam_size="1558M", instruct_size="1558M")
    spec = load_spec("load_gpt2")
    inputs = {"tokenize": _fake("tokenize"), "pretrain": None}
    root = tmp_path / "w"
    key_parts(spec, args, inputs, _ctx(root, "r1", mirror=str(release_mirror)))
    shutil.rmtree(root / "datasets")
    (release_mirror / "gpt2/1558M/model.ckpt.meta").write_bytes(b"model.ckpt.meta v2")
    ctx = _ctx(root, "r2", mirror=str(release_mirror))
    ctx.recorder.start_run("r2", flow_run_id=None, profile="t", config={}, git_rev=None)
    with pytest.raises(ChecksumError, match="--retrust gpt2-1558M"):
        run_stage(ctx, "load_gpt2", args, **inputs)
    row = ctx.catalog.query_df("SELECT status, message FROM stages WHERE run_id = 'r2'")
    assert row.status.tolist() == ["failed"] and "--retrust gpt2-1558M" in row.message[0]


def test_published_weight_files_are_keyed_by_their_pins_without_a_download(tmp_path: Path) -> None:
    from gpt.data.sources import get_source

    args = LoadGPT2Args(base_model="gpt2", spam_size="124M", instruct_size="124M")
    spec = load_spec("load_gpt2")
    parts = key_parts(spec, args, {"tokenize": _fake("tokenize"), "pretrain": None},
                      _ctx(tmp_path, "r", mirror=str(tmp_path / "no-mirror")))  # fmt: skip
    assert parts.files == {f.path: f.sha256 for f in get_source("gpt2-124M").files}
    scratch = LoadGPT2Args(base_model="scratch")
    assert key_parts(spec, scratch, {"tokenize": _fake("tokenize"), "pretrain": _fake("p")},
                     _ctx(tmp_path, "r")).files == {}  # fmt: skip


# --------------------------------------------------------------------------- the reason


def test_key_changes_name_each_part() -> None:
    a = KeyParts("s", {"lr": 1}, {"tokenize": "d1"}, "c1", {"torch": "2.4.0"}, {"f": "x"})
    assert key_changes(a.summary(), a.summary()) == []
    b = KeyParts("s", {"lr": 2}, {"tokenize": "d2"}, "c2", {"torch": "2.5.0"}, {"f": "y"})
    assert key_changes(a.summary(), b.summary()) == [
        "settings",
        "inputs (tokenize)",
        "code",
        "packages (torch 2.4.0 -> 2.5.0)",
        "input files (f)",
    ]
    old = {k: v for k, v in a.summary().items() if k != "packages"}  # recorded before
    assert key_changes(old, b.summary())[-1] == "input files (f)"


@pytest.fixture(scope="module")
def tokenized(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("keys")
    cfg = build_config("smoke")
    ctx = _ctx(root, "run-0", mirror=str(mirror))
    dl = run_stage(ctx, "download", cfg.download)
    return {"root": root, "cfg": cfg, "tok": run_stage(ctx, "tokenize", cfg.tokenize, download=dl)}


def test_the_runs_view_says_why_a_stage_recomputed(
    tokenized: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root, cfg, tok = tokenized["root"], tokenized["cfg"], tokenized["tok"]

    def run(run_id: str, args: Any) -> StageOutput:
        ctx = _ctx(root, run_id)
        ctx.recorder.start_run(run_id, flow_run_id=None, profile="smoke", config={}, git_rev=None)
        out = run_stage(ctx, "baseline_spam", args, tokenize=tok)
        ctx.recorder.end_run(run_id, "completed")
        return out

    first = run("run-1", cfg.baseline_spam)
    assert run("run-2", cfg.baseline_spam).cache_hit
    real = package_versions("tasks.stages.baseline_spam")["scikit-learn"]
    _fake_version(monkeypatch, "scikit-learn", "999.0")
    again = run("run-3", cfg.baseline_spam)
    assert not again.cache_hit and again.key != first.key
    capsys.readouterr()
    assert main(["runs", "run-3", "--db", str(root / "catalog.duckdb")]) == 0
    shown = capsys.readouterr().out
    assert f"packages (scikit-learn {real} -> 999.0) changed since run run-" in shown, shown

    other = run("run-4", cfg.baseline_spam.replace(max_iter=cfg.baseline_spam.max_iter + 1))
    assert not other.cache_hit
    main(["runs", "run-4", "--db", str(root / "catalog.duckdb")])
    assert "recomputed: settings changed since run run-3" in capsys.readouterr().out
