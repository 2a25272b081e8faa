"""Small file helpers shared by the library and the tasks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def link_or_copy_tree(src: str | Path, dst: str | Path) -> Path:
    """Recreate folder ``src`` at ``dst`` (which must not exist) with hard links to its
    files, copying where the file system refuses links (another device, no support).
    The copy is assembled under a temporary name and renamed into place."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)
    return dst


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it is shown, so no thread sees it
    change; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def match_umask(path: str | Path) -> None:
    """Give a file written by a tool that makes private files (safetensors, ``mkstemp``)
    the mode every other output has (:func:`default_file_mode`)."""
    os.chmod(path, default_file_mode())


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "wb", *, encoding: str | None = None, fsync: bool = True
) -> Iterator[IO[Any]]:
    """Open a hidden temp file beside ``path`` for writing; on a clean exit it is flushed,
    fsync'ed and renamed onto ``path``, otherwise removed (``path`` is never half-written).
    The file is created like a plain ``open()`` would (0o666 less the umask), unlike
    ``tempfile.mkstemp``'s 0600. A ``path`` that exists and is not a regular file (a
    device such as ``/dev/null`` or ``/dev/stdout``, a named pipe) is written in place:
    renaming onto it would replace the device with a file."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    try:
        special = not stat.S_ISREG(path.stat().st_mode) and not path.is_dir()
    except FileNotFoundError:
        special = False
    if special:
        with open(path, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as out:
            yield out
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "w":
            fh: IO[Any] = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
            fh = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(
    tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file whose bytes depend only on the tensors and
    ``metadata``: the safetensors writer stores the metadata from a hash map whose order
    changes from one call to the next, so the header is rewritten with the metadata keys
    sorted (same length; the tensors and their data stay where they are). The file gets
    the mode every other output has. Raises ``OSError`` when writing fails."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:  # an I/O error inside the Rust writer
        raise OSError(f"writing {path.name} failed: {exc}") from exc
    if metadata and len(metadata) > 1:
        with open(path, "r+b") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) > size:  # the writer escapes as Python does: never longer
                raise OSError(f"rewriting the header of {path.name} would move its data")
            fh.seek(8)
            fh.write(text.ljust(size, b" "))
    match_umask(path)
