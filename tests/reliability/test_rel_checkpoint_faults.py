"""Corrupt checkpoints and disk errors while writing one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from _rel_helpers import TINY, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.errors import CheckpointError


def _load(path: Path, verify: bool = True):
    from gpt.checkpoint import load_checkpoint

    return load_checkpoint(path, verify=verify)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "manifest.json"])
@pytest.mark.parametrize("keep", [0, 7, 0.5])
def test_truncated_file_is_a_checkpoint_error_naming_it(
    lm_checkpoint: Path, name: str, keep: float
) -> None:
    f = lm_checkpoint / name
    data = f.read_bytes()
    f.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    for verify in (True, False):
        if name == "manifest.json" and not verify:
            continue  # not read without verification
        with pytest.raises(CheckpointError) as info:
            _load(lm_checkpoint, verify=verify)
        assert str(f) in str(info.value), info.value


_BIT = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_BIT
@given(data=st.data())
def test_bit_flip_anywhere_is_caught_by_the_manifest(
    lm_checkpoint: Path, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(["model.safetensors", "config.json"]))
    f = lm_checkpoint / name
    original = f.read_bytes()
    pos = data.draw(st.integers(0, len(original) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(original)
    flipped[pos] ^= 1 << bit
    f.write_bytes(bytes(flipped))
    try:
        with pytest.raises(CheckpointError) as info:
            _load(lm_checkpoint)
        assert str(f) in str(info.value)
    finally:
        f.write_bytes(original)


@_BIT
@given(data=st.data())
def test_bit_flip_in_headers_without_manifest_never_crashes(
    lm_checkpoint: Path, data: st.DataObject
) -> None:
    """With verification off, a flip in the safetensors header or config.json is a
    CheckpointError or (for a flip that keeps them valid) a model of the right shapes."""
    name = data.draw(st.sampled_from(["model.safetensors", "config.json"]))
    f = lm_checkpoint / name
    original = f.read_bytes()
    if name == "model.safetensors":
        header_len = 8 + int.from_bytes(original[:8], "little")
        pos = data.draw(st.integers(0, header_len - 1))
    else:
        pos = data.draw(st.integers(0, len(original) - 1))
    flipped = bytearray(original)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    f.write_bytes(bytes(flipped))
    try:
        try:
            loaded = _load(lm_checkpoint, verify=False)
        except CheckpointError as exc:
            assert str(lm_checkpoint) in str(exc)
        else:
            for k, v in loaded.model.state_dict().items():
                assert v.device.type == "cpu" and not v.is_meta, k
    finally:
        f.write_bytes(original)


# --------------------------------------------------------------------------- disk errors


def _model(seed: int) -> torch.nn.Module:
    from gpt.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY))


def _assert_previous_intact(ckpt: Path, digest: dict[str, str], model: torch.nn.Module) -> None:
    assert tree_digest(ckpt) == digest
    assert _same_weights(_load(ckpt).model, model)
    leftovers = [p.name for p in ckpt.parent.iterdir() if p.name.startswith(f".{ckpt.name}.")]
    assert leftovers == [], leftovers


def test_save_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    from gpt.checkpoint import save_checkpoint

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    target = blocker / "ckpt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, _model(0))
    assert str(target) in str(info.value)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("where", ["weights", "optimizer", "json"])
def test_disk_full_mid_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC while the new checkpoint is written: a CheckpointError naming the folder,
    and the previous checkpoint byte-identical and loadable."""
    import safetensors.torch

    from gpt import checkpoint as ck

    old_model = _model(0)
    ckpt = ck.save_checkpoint(
        tmp_path / "ckpt", old_model, optimizer=torch.optim.AdamW(old_model.parameters())
    )
    digest = tree_digest(ckpt)

    def full(*a: object, **k: object) -> None:
        path = next((x for x in a if isinstance(x, str | Path)), "?")
        Path(str(path)).write_bytes(b"\0" * 10)  # a partly written file
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    elif where == "optimizer":
        monkeypatch.setattr(torch, "save", full)
    else:
        monkeypatch.setattr(ck, "write_json", full)
    new_model = _model(1)
    with pytest.raises((CheckpointError, OSError)) as info:
        ck.save_checkpoint(ckpt, new_model, optimizer=torch.optim.AdamW(new_model.parameters()))
    monkeypatch.undo()
    _assert_previous_intact(ckpt, digest, old_model)
    # the error is the project's own, names the checkpoint and keeps the OS's reason
    assert isinstance(info.value, CheckpointError), repr(info.value)
    assert str(ckpt) in str(info.value) and "No space left" in str(info.value)


def test_failed_swap_into_place_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new folder is complete but renaming it into place fails (EIO): the previous
    checkpoint must still be at its path, loadable.

    The EIO hits the first rename onto the checkpoint's path only (the new folder's):
    a save can only put the previous folder back by renaming it onto that path too."""
    from gpt import checkpoint as ck

    old_model = _model(0)
    ckpt = ck.save_checkpoint(tmp_path / "ckpt", old_model)
    digest = tree_digest(ckpt)
    real_rename = os.rename
    calls: list[tuple[str, str]] = []

    def flaky(src: object, dst: object) -> None:
        calls.append((str(src), str(dst)))
        if Path(str(dst)) == ckpt and not any(Path(d) == ckpt for _, d in calls[:-1]):
            raise OSError(errno.EIO, "Input/output error", str(dst))  # the new folder
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", flaky)
    with pytest.raises((CheckpointError, OSError)):
        ck.save_checkpoint(ckpt, _model(1))
    monkeypatch.undo()
    assert calls, "save_checkpoint no longer renames with os.rename: update this test"
    _assert_previous_intact(ckpt, digest, old_model)


def test_unserialisable_state_fails_before_touching_previous(tmp_path: Path) -> None:
    from gpt import checkpoint as ck

    old_model = _model(0)
    ckpt = ck.save_checkpoint(tmp_path / "ckpt", old_model)
    digest = tree_digest(ckpt)
    with pytest.raises(CheckpointError) as info:
        ck.save_checkpoint(ckpt, _model(1), extra_state={"bad": object()})
    assert "trainer_state.json" in str(info.value)
    _assert_previous_intact(ckpt, digest, old_model)
