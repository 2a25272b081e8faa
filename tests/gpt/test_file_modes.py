"""Every file the library writes gets the mode a plain ``open()`` would give it
(0o666 minus the umask): weights, training state, plots, token files and the responses
export used to be 0600 (temp files from ``mkstemp`` / safetensors) beside 0644 outputs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.data.windows import save_tokens
from gpt.fileio import atomic_open, default_file_mode
from gpt.model import GPT, GPTConfig
from gpt.recipes.extract import export_responses_json
from gpt.recipes.pretrain import plot_losses

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_default_file_mode_follows_the_umask(umask: int) -> None:
    assert default_file_mode() == 0o666 & ~umask


def test_library_outputs_share_the_plain_open_mode(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(
        tmp_path / "ckpt",
        model,
        optimizer=opt,
        extra_state={"step": 1, "t": torch.zeros(3)},
        hparams={"lr": 1e-3},
    )
    metrics = [
        {"split": s, "name": "loss", "seen": i * 10, "value": 5.0 - i}
        for i in range(3)
        for s in ("train", "val")
    ]
    plot_losses(metrics, tmp_path / "loss.png")
    save_tokens([1, 2, 3], tmp_path / "tokens" / "train.npy", vocab_size=97)
    export_responses_json(
        [{"instruction": "i", "input": "", "output": "o", "response": "r"}],
        tmp_path / "responses.json",
    )
    (tmp_path / "plain.txt").write_text("a plain open()")
    modes = _modes(tmp_path)
    assert {"ckpt/model.safetensors", "loss.png", "tokens/train.npy", "responses.json"} <= set(
        modes
    )
    assert any(name.startswith("ckpt/") and "trainer" in name for name in modes), modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != expected}
    assert not wrong, f"expected {oct(expected)} everywhere, got {wrong}"


def test_atomic_open_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left
    with atomic_open(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == default_file_mode()


def test_atomic_open_writes_into_a_device_or_pipe_in_place(tmp_path: Path) -> None:
    """``--markdown /dev/stdout`` or a named pipe: the bytes go through it and the special
    file stays what it was (renaming a temp file onto it replaced /dev/null with a
    regular file when run as root)."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_open(fifo, "w") as fh:
        fh.write("through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temp file beside it
