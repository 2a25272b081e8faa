"""Zip extraction that never writes outside its folder.

Every member name is checked before anything is written (no absolute paths, no ``..``,
no backslash tricks, no links leaving the folder); members are extracted into a fresh
temporary folder beside the target, size-capped, and the folder is moved into place only
when the whole archive extracted cleanly. The zipfile module's errors become a
:class:`~gpt.errors.DataError` naming the archive and member.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gpt.errors import DataError, UnsafeArchiveError
from gpt.fileio import current_umask

_CHUNK = 1 << 16


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    norm = name.replace("\\", "/")
    if not norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract "
            "(the archive is corrupt or malicious: delete it and download it again)"
        )
    p = PurePosixPath(norm)
    if ".." in p.parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would escape the extraction folder ('..'); "
            "refusing to extract (the archive is corrupt or malicious: delete it and "
            "download it again)"
        )
    return p


def _inside(root: Path, candidate: Path) -> bool:
    root_r = os.path.realpath(root)
    cand_r = os.path.realpath(candidate)
    return cand_r == root_r or cand_r.startswith(root_r + os.sep)


#: What the zipfile module raises for a damaged or unsupported member: a corrupt
#: deflate/bzip2/lzma stream, a CRC mismatch, an unknown compression method, an
#: encrypted member, a member cut short.
_MEMBER_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    EOFError,
    UnicodeDecodeError,
)


@contextlib.contextmanager
def _member_errors(zip_path: Path, info: zipfile.ZipInfo) -> Iterator[None]:
    """Turn the zipfile module's errors while reading ``info`` into a DataError."""
    try:
        yield
    except _MEMBER_ERRORS as exc:
        raise DataError(
            f"{zip_path}: member {info.filename!r} is damaged or unreadable "
            f"({type(exc).__name__}: {exc}); download the archive again"
        ) from exc


def extract_to_temp(zip_path: Path, parent: Path, name: str, max_bytes: int) -> Path:
    """Extract every member of ``zip_path`` into a new temp folder under ``parent``."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{zip_path}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        names = [(info, _check_member_name(info.filename, zip_path)) for info in infos]
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{zip_path}: members would expand to {total:,} bytes (limit {max_bytes:,}); "
                "refusing to extract"
            )
        links: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        link_ids: set[int] = set()
        for info, p in names:
            if stat.S_ISLNK(info.external_attr >> 16):
                with _member_errors(zip_path, info):
                    target = zf.read(info).decode("utf-8", "replace")
                resolved = os.path.normpath(os.path.join(str(p.parent), target))
                if (
                    target.startswith(("/", "\\"))
                    or re.match(r"^[A-Za-z]:", target)
                    or resolved == ".."
                    or resolved.startswith("../")
                ):
                    raise UnsafeArchiveError(
                        f"{zip_path}: member {info.filename!r} is a symlink to {target!r}, "
                        "outside the extraction folder; refusing to extract"
                    )
                links.append((info, p))
                link_ids.add(id(info))
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".extract", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; this is a plain folder
        try:
            for info, p in names:
                if id(info) in link_ids:
                    continue
                dest = tmp.joinpath(*p.parts) if p.parts else tmp
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not _inside(tmp, dest.parent):
                    raise UnsafeArchiveError(
                        f"{zip_path}: member {info.filename!r} would be written through a "
                        "symlink outside the extraction folder; refusing to extract"
                    )
                with (
                    _member_errors(zip_path, info),
                    zf.open(info) as src,
                    open(dest, "wb") as out,
                ):
                    shutil.copyfileobj(src, out, _CHUNK)
            for info, p in links:
                dest = tmp.joinpath(*p.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with _member_errors(zip_path, info):
                    link_target = zf.read(info).decode("utf-8")
                os.symlink(link_target, dest)
                if not _inside(tmp, dest):
                    raise UnsafeArchiveError(
                        f"{zip_path}: symlink member {info.filename!r} resolves outside the "
                        "extraction folder; refusing to extract"
                    )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return tmp


def install_dir(tmp: Path, target: Path) -> None:
    """Move an extracted temp folder into place, replacing ``target``."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safe_extract_zip(
    zip_path: str | Path, target_dir: str | Path, *, max_bytes: int = 4 << 30
) -> list[Path]:
    """Extract a zip into ``target_dir`` (replacing it) and return the extracted files.

    Every member is checked before anything is written: an absolute path, a ``..``
    component or a symlink pointing outside the folder raises UnsafeArchiveError. The
    members go to a temp folder first, which is then renamed into place.
    """
    zip_path, target_dir = Path(zip_path), Path(target_dir)
    tmp = extract_to_temp(zip_path, target_dir.parent, target_dir.name, max_bytes)
    rel = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
    install_dir(tmp, target_dir)
    return [target_dir / r for r in rel]
