"""The file operations under :mod:`gpt.checkpoint`: durable writes, the folder swap that
keeps the previous version until the new one is complete (and its recovery after a kill),
and the readers that refuse anything but plain data (safetensors with a checked header,
optimizer states through ``torch.load(weights_only=True)``).

Every error is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt.errors import CheckpointError

log = logging.getLogger("gpt.checkpoint")

_TENSOR_REF = "__tensor__"
_MAX_HEADER = 100 * 1024 * 1024


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise CheckpointError(
            f"cannot store {path.name}: value is not JSON-serializable ({exc})"
        ) from exc
    path.write_text(text + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON ({exc})") from exc


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace tensors inside nested dicts/lists by references; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR_REF: prefix}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Put the tensors of ``tensors`` back where :func:`split_tensors` left references;
    ``where`` names the two files for the error when one is missing."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            key = obj[_TENSOR_REF]
            if key not in tensors:
                raise CheckpointError(where.format(key=repr(key)))
            return tensors[key]
        return {k: join_tensors(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors, where) for v in obj]
    return obj


def swap_in(tmp: Path, target: Path) -> None:
    """Replace the folder ``target`` by the complete folder ``tmp``.

    ``target`` is renamed aside to ``.NAME.old-*`` first, then ``tmp`` renamed in. When
    the second rename fails the old folder is renamed back. A process killed between
    the two renames leaves only ``.NAME.old-*``: :func:`recover_checkpoint` (called on
    load) puts it back.
    """
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except Exception as exc:  # a kill (BaseException) is left to recover_checkpoint
        try:
            os.rename(old, target)
        except OSError as back:
            raise CheckpointError(
                f"cannot write checkpoint {target}: moving the new version into place "
                f"failed ({exc}) and so did moving the previous one back ({back}); the "
                f"previous checkpoint is intact at {old} and is restored on the next load"
            ) from exc
        raise
    shutil.rmtree(old, ignore_errors=True)


def old_versions(path: Path) -> list[Path]:
    """``.NAME.old-*`` siblings of ``path`` (left by an interrupted swap), newest first."""
    if not path.parent.is_dir():
        return []
    olds = [p for p in path.parent.glob(f".{path.name}.old-*") if p.is_dir()]

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(olds, key=mtime, reverse=True)


def remove_stale_olds(target: Path) -> None:
    for old in old_versions(target):
        log.info("removing %s, left by an interrupted checkpoint save", old)
        shutil.rmtree(old, ignore_errors=True)


def restore_swapped(dir: str | Path, verify: Callable[[Path], object]) -> Path | None:
    """Undo an interrupted :func:`swap_in`: when ``dir`` is missing but a swap killed
    between its two renames left the previous version aside as ``.NAME.old-*`` (complete:
    ``verify`` accepts it), that folder is renamed back to ``dir`` (with a warning).
    Returns ``dir`` when a folder is (now) there, else None."""
    path = Path(dir).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path.is_symlink():
        return None
    for old in old_versions(path):
        try:
            verify(old)
        except CheckpointError as exc:
            log.warning("not restoring %s: %s", old, exc)
            continue
        try:
            os.rename(old, path)
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint folder {path} is missing and restoring the previous version "
                f"from {old} failed ({exc}); rename it to {path.name} by hand"
            ) from exc
        fsync_dir(path.parent)
        log.warning(
            "checkpoint folder %s was missing (a save was interrupted); restored the "
            "previous checkpoint from %s",
            path,
            old,
        )
        return path
    return None


def check_safetensors_header(f: Path) -> None:
    """Refuse anything that is not a safetensors file (pickles, zips, garbage) before
    handing it to the safetensors parser."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f} is truncated: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            kind = (
                "a pickle"
                if head[:1] == b"\x80"
                else "a zip (torch.save)"
                if head[:2] == b"PK"
                else "not safetensors"
            )
            raise CheckpointError(
                f"{f} is not a valid safetensors file (looks like {kind}); refusing to load it"
            )
        header = fh.read(n)
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f} has a corrupt safetensors header ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} has a corrupt safetensors header")


def load_safetensors(f: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_header(f)
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {f}: {exc}") from exc


def load_optimizer(f: Path, map_location: str | torch.device) -> dict[str, Any]:
    import pickle

    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"refusing to load {f}: not a plain optimizer state_dict "
            f"(weights_only load failed: {str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{f} does not hold an optimizer state_dict")
    return state
