"""Trust on first use: the digest a file without a published sha256 is held to.

Some inputs (most GPT-2 weight files) have no published sha256. Their first verified
download is trusted, and its sha256 and size become the file's **trust record**; every
later download must match it, or it is refused. A record lives in three places, so that
losing one does not silently trust a changed file again:

- beside the file in the datasets folder: its download record ``.<name>.download.json``
  (written by :mod:`gpt.data.download` after each verified download);
- in the catalog's ``sources`` table (rows named ``<source>:<path>``), passed to the
  downloader as ``trusted``;
- in the records of the runs that used the file (``artifacts/runs/<run>.json``), from
  which ``gptflow catalog rebuild`` restores ``sources``.

When the records a download can see disagree, nothing is guessed: the download is
refused. Accepting a changed file is explicit: ``--retrust NAME`` (``gptflow download``,
``gptflow run``) fetches it again, whatever its digest, and records the new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.data.sources import SOURCES, Source, SourceFile
from gpt.data.transfer import read_sidecar, sidecar
from gpt.errors import ChecksumError, ConfigError
from gpt.fileio import sha256_file

#: How the catalog's record of a file is named (``<source>:<path>``).
CATALOG_RECORD = "the catalog's sources table"


@dataclass(frozen=True)
class TrustRecord:
    """One record of the digest a trust-on-first-use file is held to."""

    sha256: str
    bytes: int
    where: str
    """Where the record was read (for messages)."""


def is_trusted_on_first_use(f: SourceFile) -> bool:
    """True for a file without a published sha256 whose bytes are held to a record.
    Archives are excluded: their bytes legitimately differ between hosts, and their
    members are verified instead."""
    return f.sha256 is None and not f.is_archive


def trust_records(
    f: SourceFile,
    trusted: Mapping[str, tuple[str, int]] | None,
    download_record: Mapping[str, Any] | None,
    download_record_path: str = "the download record",
) -> list[TrustRecord]:
    """The records of ``f`` that a download can see: ``trusted`` (the catalog's) and the
    download record beside the file (read by the caller)."""
    out: list[TrustRecord] = []
    if trusted and f.path in trusted:
        sha, nbytes = trusted[f.path]
        out.append(TrustRecord(str(sha), int(nbytes), CATALOG_RECORD))
    rec = download_record or {}
    if isinstance(rec.get("sha256"), str) and rec.get("path", f.path) == f.path:
        out.append(TrustRecord(rec["sha256"], int(rec.get("bytes") or 0), download_record_path))
    return out


def held_to(
    source: str,
    f: SourceFile,
    records: list[TrustRecord],
    retrust: Collection[str] = (),
) -> tuple[SourceFile, bool]:
    """``f`` expecting the digest its trust records agree on, and whether it is held to
    one. A file with a published sha256, an archive, a file named in ``retrust`` (its
    paths) or one with no record yet (first use) is returned as is. Records that
    disagree raise :class:`ChecksumError` naming both and the fix."""
    if not is_trusted_on_first_use(f) or f.path in retrust or not records:
        return f, False
    digests = {r.sha256 for r in records}
    if len(digests) > 1:
        seen = ", ".join(f"{r.where} says {r.sha256[:16]}…" for r in records)
        raise ChecksumError(
            f"{f.path} of source {source!r} has no published sha256 and its trust-on-first-use "
            f"records disagree ({seen}): the file changed since it was first trusted; "
            f"nothing is guessed. If the change is intended, accept the file the source "
            f"serves now with `--retrust {source}` (gptflow download or gptflow run)"
        )
    rec = records[0]
    size = f.size if f.size is not None else rec.bytes
    return dataclasses.replace(f, sha256=rec.sha256, size=size), True


def retrust_paths(names: Iterable[str], sources: Iterable[Source] | None = None) -> set[str]:
    """The paths of the trust-on-first-use files that ``--retrust NAME`` arguments name:
    a source (``gpt2-355M``: its files without a published sha256), ``<source>:<path>``
    (as the catalog names it) or a path under the datasets folder. An unknown name, or
    one whose files all have a published sha256, is a :class:`ConfigError`."""
    known = list(SOURCES.values()) if sources is None else list(sources)
    by_name = {s.name: s for s in known}
    by_path = {f.path: (s, f) for s in known for f in s.files}
    out: set[str] = set()
    for name in names:
        if name in by_name:
            files = [f for f in by_name[name].files if is_trusted_on_first_use(f)]
        else:
            path = (
                name.split(":", 1)[1] if ":" in name and name.split(":", 1)[0] in by_name else name
            )
            if path not in by_path:
                tofu = sorted(s.name for s in known if any(map(is_trusted_on_first_use, s.files)))
                raise ConfigError(
                    f"--retrust {name}: no such source or file; name a source with files "
                    f"trusted on first use ({', '.join(tofu)}) or one of its files' paths"
                )
            files = [f for f in (by_path[path][1],) if is_trusted_on_first_use(f)]
        if not files:
            raise ConfigError(
                f"--retrust {name}: every file of it is verified against a published sha256 "
                "(an archive: its members), never trusted on first use: nothing to retrust"
            )
        out.update(f.path for f in files)
    return out


def with_trusted(
    source: str,
    f: SourceFile,
    dest: Path,
    trusted: Mapping[str, tuple[str, int]] | None,
    retrust: Collection[str] = (),
) -> tuple[SourceFile, bool]:
    """``f`` expecting the digest recorded at its first verified download (trust on first
    use, :mod:`gpt.data.trust`): ``trusted``'s and the download record's beside the file;
    the flag says so."""
    final = dest / f.path
    records = trust_records(f, trusted, read_sidecar(final), str(sidecar(final)))
    return held_to(source, f, records, retrust)


def stat_verified(held: SourceFile, final: Path) -> bool:
    """True when ``final`` is absent, or is the file its download record describes (same
    size and mtime) and that record holds ``held``'s digest: no hashing needed."""
    try:
        st = final.stat()
    except FileNotFoundError:
        return True
    rec = read_sidecar(final) or {}
    return (
        rec.get("sha256") == held.sha256
        and rec.get("bytes") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
    )


def changed_here(held: SourceFile, dest: Path) -> str | None:
    """The sha256 of the file in ``dest`` when it is present and differs from the digest
    ``held`` is held to (changed since its verified download), else None."""
    final = dest / held.path
    if stat_verified(held, final):
        return None
    sha = sha256_file(final)
    return None if sha == held.sha256 else sha
