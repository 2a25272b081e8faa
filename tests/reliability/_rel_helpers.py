"""Small helpers shared by the reliability tests (not fixtures)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PYTHON = sys.executable

#: Architecture of every tiny model here (GPT-2 vocabulary so the real tokenizer fits).
TINY = {"context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): sha256_bytes(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def rewrite_manifest(folder: Path) -> None:
    """Make a checkpoint's manifest.json agree with the files as they are now (what an
    attacker who controls the folder would do)."""
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for rel in manifest["files"]:
        data = (folder / rel).read_bytes()
        manifest["files"][rel] = {"sha256": sha256_bytes(data), "size": len(data)}
    mpath.write_text(json.dumps(manifest))


def wait_for(
    cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    """Poll ``cond`` every 20 ms until true; AssertionError after ``timeout`` seconds
    (or when ``proc`` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {out}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
