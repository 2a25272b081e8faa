"""Hostile files and commands: pickles disguised as checkpoints, archives escaping their
folder, writes through ``gptflow sql``, huge or binary prompts."""

from __future__ import annotations

import io
import logging
import os
import pickle
import stat
import zipfile
from pathlib import Path

import pytest
from _rel_helpers import TINY, rewrite_manifest, sha256_bytes, tree_digest

from gpt.errors import CheckpointError, UnsafeArchiveError


class _Evil:
    """Unpickling this creates ``self.marker`` (stands for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state": _Evil(marker), "param_groups": []}, protocol=2)


def _evil_torch_save(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state": _Evil(marker), "param_groups": []}, buf)
    return buf.getvalue()


def _check_marker_is_real(marker: Path, payload: bytes) -> None:
    """The payload really runs code when unpickled (so refusing it means something)."""
    pickle.loads(payload if payload[:1] == b"\x80" else _evil_pickle(marker))
    assert marker.exists()
    marker.unlink()


# --------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("verify", [True, False])
def test_pickle_disguised_as_safetensors_is_refused(
    lm_checkpoint: Path, tmp_path: Path, how: str, verify: bool
) -> None:
    from gpt.checkpoint import load_checkpoint

    marker = tmp_path / "PWNED"
    payload = _evil_pickle(marker) if how == "pickle" else _evil_torch_save(marker)
    if how == "pickle":
        _check_marker_is_real(marker, payload)
    weights = lm_checkpoint / "model.safetensors"
    weights.write_bytes(payload)
    rewrite_manifest(lm_checkpoint)  # the attacker controls the whole folder
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(lm_checkpoint, verify=verify)
    assert str(weights) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_optimizer_state_is_refused(
    lm_checkpoint: Path, tmp_path: Path, how: str
) -> None:
    from gpt.checkpoint import load_checkpoint

    marker = tmp_path / "PWNED"
    payload = _evil_pickle(marker) if how == "pickle" else _evil_torch_save(marker)
    opt = lm_checkpoint / "optimizer.pt"
    opt.write_bytes(payload)
    import json

    m = json.loads((lm_checkpoint / "manifest.json").read_text())
    m["files"]["optimizer.pt"] = {"sha256": sha256_bytes(payload), "size": len(payload)}
    (lm_checkpoint / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(lm_checkpoint, with_optimizer=True)
    assert str(opt) in str(info.value)
    assert not marker.exists()


def test_malicious_resume_state_stops_training(lm_checkpoint: Path, tmp_path: Path) -> None:
    """A poisoned out_dir/last makes train_lm stop with CheckpointError before any step."""
    import shutil

    import torch

    from gpt.data.windows import SlidingWindowDataset, make_loader
    from gpt.model import GPT, GPTConfig
    from gpt.train import LMTrainArgs, train_lm

    out = tmp_path / "train"
    shutil.copytree(lm_checkpoint, out / "last")
    marker = tmp_path / "PWNED"
    payload = _evil_pickle(marker)
    (out / "last" / "optimizer.pt").write_bytes(payload)
    (out / "last" / "trainer_state.json").write_text('{"version": 1}')
    import json

    m = json.loads((out / "last" / "manifest.json").read_text())
    m["files"]["optimizer.pt"] = {"sha256": sha256_bytes(payload), "size": len(payload)}
    (out / "last" / "manifest.json").write_text(json.dumps(m))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = SlidingWindowDataset(torch.arange(200), 8, 8)
    loader = make_loader(ds, 2, shuffle=True, drop_last=True, seed=1)
    with pytest.raises(CheckpointError):
        train_lm(
            model,
            loader,
            None,
            LMTrainArgs(epochs=1),
            out_dir=out,
            progress=False,
        )
    assert not marker.exists()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- archives


def _crafted_zip(path: Path, evil_name: str, *, symlink_to: str | None = None) -> None:
    """The SMS zip with the real member plus one hostile member."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\thello\n")
        info = zipfile.ZipInfo(evil_name)
        if symlink_to is not None:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, symlink_to)
        else:
            zf.writestr(info, "owned\n")


@pytest.mark.parametrize(
    "evil_name,symlink_to",
    [
        ("../escaped.txt", None),
        ("sub/../../escaped.txt", None),
        ("ABSOLUTE", None),
        ("..\\escaped.txt", None),
        ("link", "../../escaped.txt"),
        ("link", "/etc"),
    ],
)
def test_archive_escaping_its_folder_is_refused(
    tmp_path: Path, evil_name: str, symlink_to: str | None
) -> None:
    from gpt.data.download import download_sources

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    dest = tmp_path / "deep" / "datasets"
    victim = tmp_path / "victim" / "escaped.txt"
    if evil_name == "ABSOLUTE":
        evil_name = str(victim)
    _crafted_zip(mirror / "sms+spam+collection.zip", evil_name, symlink_to=symlink_to)
    before = tree_digest(tmp_path)
    with pytest.raises(UnsafeArchiveError) as info:
        download_sources(["sms-spam"], dest=dest, mirror=mirror, progress=False)
    msg = str(info.value)
    assert "sms+spam+collection.zip" in msg and "refusing" in msg
    assert not victim.exists()
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    # nothing usable and no partial file was left behind; nothing outside dest changed
    assert not (dest / "sms+spam+collection.zip").exists()
    assert not (dest / "sms+spam+collection.zip.part").exists()
    assert not (dest / "sms_spam_collection").exists()
    after = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("deep/")}
    assert after == before


def test_corrupt_archive_through_download_is_a_clear_error(tmp_path: Path) -> None:
    """A zip whose deflate stream is damaged fails as a gptflow error, leaving no file."""
    from gpt.data.download import download_sources
    from gpt.errors import GPTFlowError

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    p = mirror / "sms+spam+collection.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", b"ham\thello there\n" * 200)
    b = bytearray(p.read_bytes())
    start = b.find(b"SMSSpamCollection") + len("SMSSpamCollection")
    for k in range(start + 5, start + 25):
        b[k] ^= 0xFF
    p.write_bytes(bytes(b))
    dest = tmp_path / "datasets"
    with pytest.raises(GPTFlowError) as info:
        download_sources(["sms-spam"], dest=dest, mirror=mirror, progress=False)
    assert "sms+spam+collection.zip" in str(info.value)
    assert not (dest / "sms+spam+collection.zip").exists()
    assert not (dest / "sms_spam_collection" / "SMSSpamCollection").exists()


# --------------------------------------------------------------------------- gptflow sql


@pytest.fixture
def filled_catalog(tmp_path: Path) -> Path:
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.start_run("r1", profile="smoke", config={"a": 1})
    cat.record_metrics(
        "r1",
        "pretrain",
        [{"step": i, "split": "train", "name": "loss", "value": 1.0 / (i + 1)} for i in range(5)],
    )
    cat.publish()  # as the writing process does when it ends
    return cat.path


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM metrics",
        "UPDATE runs SET status = 'hacked'",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "DROP TABLE metrics",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; DELETE FROM metrics",
        "ALTER TABLE runs ADD COLUMN x INT",
        "COPY metrics TO 'OUT.csv'",
        "ATTACH 'OTHER.duckdb' AS o",
        "SELECT * FROM read_csv('/etc/passwd')",
        "INSTALL httpfs",
    ],
)
def test_gptflow_sql_cannot_write(
    filled_catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sql: str
) -> None:
    from flows.cli import main

    sql = sql.replace("OUT.csv", str(tmp_path / "out.csv")).replace(
        "OTHER.duckdb", str(tmp_path / "other.duckdb")
    )
    live = filled_catalog.with_name(filled_catalog.name + ".live")  # the writers' file
    before = sha256_bytes(filled_catalog.read_bytes()), sha256_bytes(live.read_bytes())
    for live_flag in ([], ["--live"]):  # the published snapshot, and the writers' file
        rc = main(["sql", sql, *live_flag])
        err = capsys.readouterr().err
        assert rc == 1
        assert err.startswith("gptflow sql: error:"), err
        assert "Traceback" not in err
    assert (sha256_bytes(filled_catalog.read_bytes()), sha256_bytes(live.read_bytes())) == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()
    assert main(["sql", "SELECT count(*) AS n FROM metrics"]) == 0
    assert capsys.readouterr().out.split()[-3] == "5"


# --------------------------------------------------------------------------- prompts


def test_generate_long_prompt_is_truncated_to_the_context(
    lm_checkpoint: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from flows.cli import main

    with caplog.at_level(logging.WARNING):
        rc = main(
            [
                "generate",
                "--checkpoint",
                str(lm_checkpoint),
                "--prompt",
                "word " * 20_000,
                "--max-new-tokens",
                "5",
            ]
        )
    assert rc == 0
    assert "keeping the last 27 (context 32 - 5 new tokens)" in caplog.text
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("prompt", ["", "   ", "\x00\x01\x02\x7f", "<|endoftext|>" * 100])
def test_generate_odd_prompts_never_traceback(
    lm_checkpoint: Path, capsys: pytest.CaptureFixture[str], prompt: str
) -> None:
    from flows.cli import main

    rc = main(
        [
            "generate",
            "--checkpoint",
            str(lm_checkpoint),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "3",
        ]
    )
    err = capsys.readouterr().err
    if prompt == "":
        assert rc == 1 and "gptflow generate: error:" in err and "empty" in err
    else:
        assert rc == 0, err


def test_classify_long_text_is_truncated(
    clf_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main
    from gpt.recipes.classifier import classify

    long = "WIN a FREE prize now " * 5000
    assert main(["classify", "--checkpoint", str(clf_checkpoint), "--json", long, "hi"]) == 0
    import json

    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["label"] in ("ham", "spam") for r in rows] == [True, True]
    # truncation: the long text scores exactly like its first 16 tokens
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(clf_checkpoint / "tokenizer")
    head = tok.decode(tok.encode(long)[:16])
    (_, p_long), (_, p_head) = classify(clf_checkpoint, [long, head])
    assert p_long == pytest.approx(p_head, abs=1e-6)
    assert rows[0]["prob_spam"] == pytest.approx(p_long, abs=1e-6)


@pytest.mark.parametrize("command", ["generate", "classify"])
def test_binary_argv_prompt_never_tracebacks(
    command: str,
    lm_checkpoint: Path,
    clf_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bytes that are not UTF-8 on the command line reach Python as surrogate escapes
    (``os.fsdecode``); with a strict UTF-8 stdout (``PYTHONIOENCODING=utf-8``, any
    non-C locale) the command answers or fails clearly: no exception escapes main()."""
    import sys

    from flows.cli import main

    text = os.fsdecode(b"\xff\xfebin\x80ary \xc3(")
    assert "\udcff" in text
    if command == "generate":
        args = [
            "generate",
            "--checkpoint",
            str(lm_checkpoint),
            "--prompt",
            text,
            "--max-new-tokens",
            "3",
        ]
    else:
        args = ["classify", "--checkpoint", str(clf_checkpoint), text]
    raw = io.BytesIO()
    strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", strict)
    rc = main(args)  # an escaping exception is the traceback a user would see
    err = capsys.readouterr().err
    assert rc in (0, 1), err
    if rc == 1:
        assert f"gptflow {command}: error:" in err
    else:
        assert raw.getvalue().strip()
