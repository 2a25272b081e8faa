"""Checkpoint folders: bit-exact round trip, atomic replace, refusal of pickles and
corrupt files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.errors import CheckpointError
from gpt.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1)


class Evil:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _trained(cfg: GPTConfig = CFG) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    loss = torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    return m, opt


def _rewrite_manifest(ck: Path) -> None:
    """What an attacker would do: make the manifest match tampered files."""
    import hashlib

    man = json.loads((ck / "manifest.json").read_text())
    for rel, info in man["files"].items():
        data = (ck / rel).read_bytes()
        info["sha256"], info["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (ck / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_bit_exact(tmp_path: Path, tokenizer_dir: Path, tie: bool) -> None:
    m, opt = _trained(CFG.replace(tie_weights=tie))
    rng = torch.get_rng_state()
    extra = {"step": 7, "epoch": 1, "tokens_seen": 1234, "rng": {"torch": rng}, "hist": [1.5, 2.0]}
    ck = save_checkpoint(
        tmp_path / "ck",
        m,
        hparams={"lr": 1e-3, "batch": 2},
        optimizer=opt,
        tokenizer_dir=tokenizer_dir,
        extra_state=extra,
        meta={"stage": "pretrain"},
    )
    loaded = load_checkpoint(ck, with_optimizer=True)
    assert loaded.config == m.cfg and loaded.kind == "lm"
    sd_a, sd_b = m.state_dict(), loaded.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    assert loaded.model.is_tied == tie
    assert loaded.hparams == {"lr": 1e-3, "batch": 2}
    assert loaded.meta == {"stage": "pretrain"}
    ts = loaded.trainer_state
    assert ts is not None and ts["step"] == 7 and ts["hist"] == [1.5, 2.0]
    assert torch.equal(ts["rng"]["torch"], rng)
    osd, lsd = opt.state_dict(), loaded.optimizer_state
    assert lsd is not None and lsd["param_groups"] == osd["param_groups"]
    for pid, st in osd["state"].items():
        for key, val in st.items():
            assert torch.equal(val, lsd["state"][pid][key])
    assert loaded.tokenizer_dir is not None
    for n in ("encoder.json", "vocab.bpe"):
        assert (loaded.tokenizer_dir / n).read_bytes() == (tokenizer_dir / n).read_bytes()
    idx = torch.randint(0, CFG.vocab_size, (1, 6))
    m.eval()
    assert torch.equal(m(idx), loaded.model(idx))
    # a fresh optimizer accepts the loaded state
    opt2 = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    opt2.load_state_dict(lsd)


def test_classifier_round_trip(tmp_path: Path) -> None:
    m, _ = _trained()
    m.replace_head(2)
    ck = save_checkpoint(tmp_path / "clf", m, labels=["ham", "spam"])
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["kind"] == "classifier" and cfg["num_classes"] == 2
    loaded = load_checkpoint(ck)
    assert loaded.kind == "classifier" and loaded.labels == ["ham", "spam"]
    assert loaded.num_classes == 2 and loaded.optimizer_state is None
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_replace_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    m1, _ = _trained()
    target = tmp_path / "ck"
    save_checkpoint(target, m1, hparams={"v": 1})
    before = (target / "model.safetensors").read_bytes()

    # a save that fails half-way (non-JSON trainer state) leaves the old one intact
    with pytest.raises(CheckpointError):
        save_checkpoint(target, GPT(CFG), hparams={"v": 2}, extra_state={"bad": object()})
    assert (target / "model.safetensors").read_bytes() == before
    assert load_checkpoint(target).hparams == {"v": 1}

    torch.manual_seed(99)
    m2 = GPT(CFG)
    save_checkpoint(target, m2, hparams={"v": 3})
    loaded = load_checkpoint(target)
    assert loaded.hparams == {"v": 3}
    assert torch.equal(loaded.model.tok_emb.weight, m2.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_pickle_as_optimizer_is_refused(tmp_path: Path) -> None:
    m, opt = _trained()
    ck = save_checkpoint(tmp_path / "ck", m, optimizer=opt)
    marker = tmp_path / "pwned"
    # the payload is live: plain unpickling does create the marker
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Evil(live)))
    assert live.exists()
    torch.save({"state": {}, "param_groups": [], "x": Evil(marker)}, ck / "optimizer.pt")
    _rewrite_manifest(ck)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt"):
        load_checkpoint(ck, with_optimizer=True)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_as_safetensors_is_refused(tmp_path: Path, how: str) -> None:
    m, _ = _trained()
    ck = save_checkpoint(tmp_path / "ck", m)
    marker = tmp_path / "pwned"
    if how == "pickle":
        (ck / "model.safetensors").write_bytes(pickle.dumps(Evil(marker), protocol=2))
    else:
        torch.save(Evil(marker), ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):  # manifest catches it
        load_checkpoint(ck)
    _rewrite_manifest(ck)  # even when the manifest is forged too
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ck, verify=False)
    assert not marker.exists()


def test_truncated_and_bit_flipped_weights(tmp_path: Path) -> None:
    m, _ = _trained()
    ck = save_checkpoint(tmp_path / "ck", m)
    f = ck / "model.safetensors"
    good = f.read_bytes()

    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ck, verify=False)  # safetensors itself notices

    flipped = bytearray(good)
    flipped[len(good) - 10] ^= 0x01  # a weight bit: only the checksum can see it
    f.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        load_checkpoint(ck)

    f.write_bytes(good)
    assert torch.equal(load_checkpoint(ck).model.tok_emb.weight, m.tok_emb.weight)


def test_missing_things(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    m, _ = _trained()
    ck = save_checkpoint(tmp_path / "ck", m)
    os.remove(ck / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(ck)
    ck = save_checkpoint(tmp_path / "ck2", m)
    os.remove(ck / "manifest.json")
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        load_checkpoint(ck)


# ------------------------------------------------------------------ interrupted swaps


class _Kill(BaseException):
    """Stands for SIGKILL: no ``except Exception`` handler runs."""


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _kill_between_renames(
    monkeypatch: pytest.MonkeyPatch, target: Path, model: torch.nn.Module
) -> None:
    """Save ``model`` over ``target`` and 'die' when the new folder is renamed in."""
    import gpt.checkpoint as ck

    real = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(dst)) == target and ".tmp-" in Path(str(src)).name:
            raise _Kill
        real(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(_Kill):
        save_checkpoint(target, model, hparams={"v": 2})
    monkeypatch.undo()


def test_kill_between_renames_is_recovered_on_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gpt.checkpoint import read_checkpoint_config, recover_checkpoint

    m1, _ = _trained()
    target = save_checkpoint(tmp_path / "ck", m1, hparams={"v": 1})
    torch.manual_seed(7)
    _kill_between_renames(monkeypatch, target, GPT(CFG))
    assert not target.exists()
    olds = [p.name for p in tmp_path.iterdir()]
    assert len(olds) == 1 and olds[0].startswith(".ck.old-"), olds

    assert read_checkpoint_config(target)["emb_dim"] == CFG.emb_dim  # restores it too
    assert any("restored the previous checkpoint" in r.getMessage() for r in caplog.records)
    loaded = load_checkpoint(target)
    assert loaded.hparams == {"v": 1} and _same(loaded.model, m1)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert recover_checkpoint(target) == target  # present: nothing to do
    assert recover_checkpoint(tmp_path / "never-saved") is None


def test_incomplete_old_version_is_not_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpt.checkpoint import recover_checkpoint

    m1, _ = _trained()
    target = save_checkpoint(tmp_path / "ck", m1)
    _kill_between_renames(monkeypatch, target, GPT(CFG))
    (old,) = tmp_path.iterdir()
    weights = old / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged while aside
    assert recover_checkpoint(target) is None
    assert not target.exists() and old.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target)
    assert str(target) in str(info.value) and str(old) in str(info.value)


def test_successful_save_removes_stale_old_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m1, _ = _trained()
    target = save_checkpoint(tmp_path / "ck", m1)
    _kill_between_renames(monkeypatch, target, GPT(CFG))
    assert len(list(tmp_path.iterdir())) == 1  # only the copy aside
    # a later save into the (missing) folder: the stale copy aside goes away
    torch.manual_seed(3)
    m3 = GPT(CFG)
    save_checkpoint(target, m3)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert _same(load_checkpoint(target).model, m3)


def test_failed_swap_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import gpt.checkpoint as ck

    m1, _ = _trained()
    target = save_checkpoint(tmp_path / "ck", m1, hparams={"v": 1})
    real = os.rename
    failures = {"left": 1}

    def rename(src: object, dst: object) -> None:
        if Path(str(dst)) == target and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, GPT(CFG), hparams={"v": 2})
    assert str(target) in str(info.value) and "Input/output error" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert load_checkpoint(target).hparams == {"v": 1}

    # both the swap and the roll-back fail: the error says where the old version is,
    # and the next load puts it back
    failures["left"] = 2
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, GPT(CFG), hparams={"v": 3})
    monkeypatch.undo()
    (old,) = tmp_path.iterdir()
    assert old.name.startswith(".ck.old-") and str(old) in str(info.value)
    loaded = load_checkpoint(target)
    assert loaded.hparams == {"v": 1} and _same(loaded.model, m1)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("where", ["parent-is-file", "disk-full"])
def test_disk_errors_are_checkpoint_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import errno

    import gpt.checkpoint as ck

    m1, _ = _trained()
    if where == "parent-is-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "ck"
        reason = "File exists"
    else:
        target = save_checkpoint(tmp_path / "ck", m1, hparams={"v": 1})

        def full(*a: object, **k: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ck, "write_json", full)
        reason = "No space left"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, m1, hparams={"v": 2})
    monkeypatch.undo()
    assert str(target) in str(info.value) and reason in str(info.value)
    if where == "disk-full":
        assert [p.name for p in tmp_path.iterdir()] == ["ck"]
        assert load_checkpoint(target).hparams == {"v": 1}
