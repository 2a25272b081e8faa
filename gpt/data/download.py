"""The downloader every stage uses.

Streams each file of a :class:`~gpt.data.sources.Source` into ``<name>.part`` next to its
destination (progress bar, bounded retries with exponential backoff, resume through HTTP
``Range``, clean restart when the server ignores it), verifies the sha256 (for a zip:
the listed members after a safe extraction), and only then renames it into place. A
file that is present and verified is skipped. A mirror (``mirror=`` or
``GPTFLOW_MIRROR``: a local folder or an http(s) base URL laid out like the datasets
folder) replaces the real URLs entirely, for air-gapped machines and tests.

A failed or corrupt download never leaves a file that a later run would accept: the
final name only ever holds verified bytes, a ``.part`` whose bytes failed verification
is deleted, and a ``.part`` kept after a cut transfer is only resumed, then verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from gpt import paths
from gpt.config import Args, operational
from gpt.data.sources import SOURCES, Source, SourceFile, resolve_sources
from gpt.data.transfer import (
    Failure,
    FileLease,
    Options,
    Tried,
    advice,
    candidates,
    now,
    read_sidecar,
    resolve_mirror,
    sidecar,
    try_location,
    unlink,
    write_json_atomic,
)
from gpt.data.trust import changed_here, retrust_paths, stat_verified, with_trusted
from gpt.errors import (
    ChecksumError,
    ConfigError,
    DownloadError,
    UnsafeArchiveError,
)
from gpt.fileio import sha256_file

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FileResult:
    """One file of a source, present and verified in the datasets folder."""

    relpath: str
    """Location relative to the datasets folder (same as in a mirror)."""
    path: Path
    """Absolute path of the downloaded file."""
    sha256: str
    """sha256 of the file's bytes (verified, or recorded when none is published)."""
    bytes: int
    """Size of the file in bytes."""
    url: str | None
    """URL (or mirror path) the bytes came from; the recorded one when skipped."""
    skipped: bool
    """True when the file was already present and verified (nothing fetched)."""
    fetched_at: datetime
    """When the bytes were fetched (UTC; the recorded time when skipped)."""
    extracted: tuple[Path, ...] = ()
    """For an archive: the verified members, extracted."""


@dataclass(frozen=True)
class DownloadResult:
    """The outcome of fetching one source."""

    name: str
    """Registry name of the source."""
    files: tuple[FileResult, ...]
    """One entry per file of the source."""

    @property
    def path(self) -> Path:
        """The main usable file: an archive's first extracted member, else the first file."""
        first = self.files[0]
        return first.extracted[0] if first.extracted else first.path

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file of the source (extracted members after their archive)."""
        out: list[Path] = []
        for f in self.files:
            out.append(f.path)
            out.extend(f.extracted)
        return tuple(out)

    @property
    def folder(self) -> Path:
        """Folder holding the source's (first) file."""
        return self.files[0].path.parent

    @property
    def sha256(self) -> str:
        """sha256 of the first file."""
        return self.files[0].sha256

    @property
    def bytes(self) -> int:
        """Total size of the source's files."""
        return sum(f.bytes for f in self.files)

    @property
    def url(self) -> str | None:
        """URL the first file came from."""
        return self.files[0].url

    @property
    def skipped(self) -> bool:
        """True when nothing had to be fetched."""
        return all(f.skipped for f in self.files)


def _present(f: SourceFile, dest: Path) -> FileResult | None:
    """A FileResult when ``f`` is already present and verified in ``dest``, else None."""
    final = dest / f.path
    rec = read_sidecar(final)
    if f.is_archive:
        assert f.extract_to is not None
        folder = dest / f.extract_to
        extracted = []
        for m in f.members:
            p = folder.joinpath(*PurePosixPath(m.name).parts)
            if not p.is_file() or (m.sha256 is not None and sha256_file(p) != m.sha256):
                return None
            extracted.append(p)
        if not folder.is_dir() or (not f.members and not any(folder.iterdir())):
            return None
        if final.is_file():
            st = final.stat()
            sha = rec.get("sha256") if rec and rec.get("bytes") == st.st_size else None
            sha, size = (sha or sha256_file(final)), st.st_size
        else:
            sha, size = (rec or {}).get("sha256", ""), int((rec or {}).get("bytes", 0))
    else:
        if not final.is_file():
            return None
        st = final.stat()
        if f.size is not None and st.st_size != f.size:
            log.warning("%s: size %d, expected %d; fetching again", final, st.st_size, f.size)
            return None
        if f.sha256 is not None:
            sha = sha256_file(final)
            if sha != f.sha256:
                log.warning("%s: sha256 %s does not match %s; fetching again", final, sha, f.sha256)
                return None
        elif (
            rec is not None
            and rec.get("bytes") == st.st_size
            and rec.get("mtime_ns") == st.st_mtime_ns
            and isinstance(rec.get("sha256"), str)
        ):
            sha = rec["sha256"]  # no published hash: trust the hash recorded at download
        else:
            return None
        size, extracted = st.st_size, []
    fetched = now()
    if rec and isinstance(rec.get("fetched_at"), str):
        with contextlib.suppress(ValueError):
            fetched = datetime.fromisoformat(rec["fetched_at"])
    return FileResult(
        relpath=f.path,
        path=final,
        sha256=sha,
        bytes=size,
        url=(rec or {}).get("url"),
        skipped=True,
        fetched_at=fetched,
        extracted=tuple(extracted),
    )


def expected_digests(
    names: Sequence[str | Source],
    dest: str | Path | None = None,
    *,
    sources: Mapping[str, Source] | None = None,
    trusted: Mapping[str, tuple[str, int]] | None = None,
    retrust: Collection[str] = (),
) -> dict[str, str | None]:
    """Path -> the sha256 of each file of ``names`` as a download into ``dest`` provides
    it, without fetching or hashing: the published one (a present file that differs is
    fetched again), else the trust record's (beside the file, or in ``trusted``) when the
    file is absent or unchanged since its download. None where only the downloader can
    tell: a file trusted on first use that has no record yet, is named in ``retrust`` or
    was changed in ``dest`` since its download; an archive."""
    resolved = resolve_sources(names, sources)
    out_dir = Path(dest).expanduser().resolve() if dest is not None else paths.datasets_dir()
    again = (
        retrust_paths(retrust, [*resolved, *(sources or SOURCES).values()]) if retrust else set()
    )
    out: dict[str, str | None] = {}
    for src in resolved:
        for f in src.files:
            held, tofu = with_trusted(src.name, f, out_dir, trusted, again)
            known = not held.is_archive and f.path not in again
            if tofu and not stat_verified(held, out_dir / f.path):
                known = False
            out[f.path] = held.sha256 if known else None
    return out


def _already_here(f: SourceFile, dest: Path, opts: Options, again: bool) -> FileResult | None:
    """The file's result when it is present and verified (and not to be fetched again)."""
    found = None if opts.refresh or again else _present(f, dest)
    if found is not None:
        log.info("%s: present and verified, skipping", found.path)
    return found


def _ensure_file(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: Options,
    tofu: bool = False,
    again: bool = False,
) -> FileResult:
    """The file present and verified, else fetched under its lease (``opts.lease``; a
    run that waited there finds the file the other one fetched: checked again inside)."""
    if (found := _already_here(f, dest, opts, again)) is not None:
        return found
    if opts.lease is None:
        return _fetch_file(source, f, dest, opts, tofu, again)
    with opts.lease(dest / f.path):
        return _fetch_file(source, f, dest, opts, tofu, again)


def _fetch_file(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: Options,
    tofu: bool = False,
    again: bool = False,
) -> FileResult:
    if (found := _already_here(f, dest, opts, again)) is not None:
        return found
    final = dest / f.path
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    tried: list[Tried] = []
    locations = candidates(f, opts)
    for idx, (kind, loc) in enumerate(locations):
        log.info("fetching %s from %s", f.path, loc)
        try:
            sha, size, extracted, _ = try_location(kind, loc, f, final, part, dest, opts)
        except Failure as fail:
            tried.append(Tried(loc, fail.detail, fail.kind, fail.attempts))
            log.warning("%s: %s", loc, fail.detail)
            if fail.kind not in ("network", "http"):
                unlink(part)
            elif idx < len(locations) - 1:
                unlink(part)  # the next URL may serve other bytes: do not resume across hosts
            continue
        os.replace(part, final)
        st = final.stat()
        fetched = now()
        write_json_atomic(
            sidecar(final),
            {
                "source": source,
                "path": f.path,
                "url": loc,
                "sha256": sha,
                "bytes": size,
                "mtime_ns": st.st_mtime_ns,
                "fetched_at": fetched.isoformat(),
            },
        )
        return FileResult(f.path, final, sha, size, loc, False, fetched, extracted)
    msg = advice(source, f, tried, opts, part, tofu)
    if any(t.kind == "unsafe" for t in tried):
        raise UnsafeArchiveError(msg)
    if tried and all(t.kind == "checksum" for t in tried):
        raise ChecksumError(msg)
    raise DownloadError(msg)


def _ensure_held(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: Options,
    trusted: Mapping[str, tuple[str, int]] | None,
    again: bool,
) -> FileResult:
    """:func:`_ensure_file` for a file held to its published or trusted digest. A file
    trusted on first use that was changed in ``dest`` since its verified download is
    refused (never fetched over, never used) unless ``again`` (``--retrust``) accepts it
    as it is; ``again`` on an unchanged or absent file fetches it and accepts the bytes."""
    try:
        held, tofu = with_trusted(source, f, dest, trusted)
    except ChecksumError:
        if not again:
            raise
        held, tofu = f, False  # the records disagree: --retrust settles it
    local = changed_here(held, dest) if tofu and not opts.refresh else None
    if local is not None and again:
        return _accept_present(source, f, dest, local)
    if local is not None:
        raise ChecksumError(
            f"{dest / f.path} of source {source!r} changed since its verified download "
            f"(sha256 {local[:16]}…, trusted on first use as {held.sha256[:16]}…; no "
            "published sha256 exists for it): delete it to download it again, or accept "
            f"the file now there with `--retrust {source}` (gptflow download or gptflow run)"
        )
    if again:
        return _ensure_file(source, f, dest, opts, False, again=True)
    return _ensure_file(source, held, dest, opts, tofu)


def _accept_present(source: str, f: SourceFile, dest: Path, sha: str) -> FileResult:
    """Trust the file now in ``dest`` (``--retrust`` of a file changed there): its download
    record takes its digest."""
    final = dest / f.path
    st = final.stat()
    accepted = now()
    write_json_atomic(
        sidecar(final),
        {
            "source": source,
            "path": f.path,
            "url": None,
            "accepted": "--retrust: the file found in the datasets folder",
            "sha256": sha,
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "fetched_at": accepted.isoformat(),
        },
    )
    log.warning("%s: changed since its download; its new sha256 %s is trusted", final, sha)
    return FileResult(f.path, final, sha, st.st_size, None, True, accepted)


# --------------------------------------------------------------------------- public API


def download_source(
    name: str | Source,
    dest: str | Path | None = None,
    *,
    mirror: str | Path | None = None,
    progress: bool = True,
    sources: Mapping[str, Source] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    trusted: Mapping[str, tuple[str, int]] | None = None,
    retrust: Collection[str] = (),
) -> DownloadResult:
    """Fetch (or skip, when present and verified) every file of one source.

    ``name`` is a registry name or a :class:`Source` (e.g. one with test URLs);
    ``sources`` overrides the registry used to look names up. ``retries`` is the number
    of attempts per URL, with exponential backoff starting at ``backoff`` seconds.
    ``trusted``: see :func:`download_sources`.
    """
    return download_sources(
        [name],
        dest,
        mirror=mirror,
        progress=progress,
        sources=sources,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        trusted=trusted,
        retrust=retrust,
    )[0]


def download_sources(
    names: Sequence[str | Source] | Iterable[str | Source],
    dest: str | Path | None = None,
    *,
    mirror: str | Path | None = None,
    progress: bool = True,
    sources: Mapping[str, Source] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    refresh: bool = False,
    trusted: Mapping[str, tuple[str, int]] | None = None,
    lease: FileLease | None = None,
    retrust: Collection[str] = (),
) -> list[DownloadResult]:
    """Fetch several sources into ``dest`` (default :func:`gpt.paths.datasets_dir`).

    Files already present and verified are skipped unless ``refresh`` (then every file
    is fetched and verified again). With a mirror (``mirror=`` or ``GPTFLOW_MIRROR``)
    only the mirror is used. Raises
    DownloadError / ChecksumError / UnsafeArchiveError naming the source, every location
    tried and what failed there, and what to do.

    ``trusted`` (trust on first use, :mod:`gpt.data.trust`): file path -> ``(sha256,
    bytes)`` recorded at an earlier verified download (the catalog's record), for files
    with no published sha256. Such a file is held to that digest and to the one in the
    download record beside it, like a published one: a download that differs raises
    ChecksumError saying so (and nothing replaces the verified copy), and records that
    disagree are refused. Record each returned :class:`FileResult`'s ``sha256``/``bytes``
    after a first download. ``retrust`` names sources or files (``--retrust NAME``)
    whose trust-on-first-use files are fetched again and accepted whatever their digest:
    the caller records the new one.

    ``lease``: taken on each destination file while it is fetched (:data:`FileLease`);
    give one whenever another process may download into the same folder.
    """
    if retries < 1:
        raise ConfigError(f"retries must be >= 1, got {retries}")
    resolved = resolve_sources(names, sources)
    again = (
        retrust_paths(retrust, [*resolved, *(sources or SOURCES).values()]) if retrust else set()
    )
    out_dir = Path(dest).expanduser().resolve() if dest is not None else paths.datasets_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = Options(
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        progress=progress,
        mirror=resolve_mirror(mirror),
        refresh=refresh,
        lease=lease,
    )
    results: list[DownloadResult] = []
    try:
        for src in resolved:
            files = tuple(
                _ensure_held(src.name, f, out_dir, opts, trusted, f.path in again)
                for f in src.files
            )
            results.append(DownloadResult(src.name, files))
    finally:
        if opts.client is not None:
            opts.client.close()
    return results


class DownloadArgs(Args):
    """Where inputs come from and how hard to try (the pipeline's ``download`` section)."""

    mirror: str | None = operational(None)
    """Local folder or http(s) base URL laid out like the remote files (``GPTFLOW_MIRROR``
    is used when unset). Only where bytes come from: checksums are verified either way."""
    retries: int = operational(3, ge=1, le=20)
    """Attempts per URL, with exponential backoff, before trying the next location."""
    backoff_s: float = operational(1.0, ge=0)
    """Delay before the second attempt; doubles after each further failure."""
    timeout_s: float = operational(30.0, gt=0)
    """Connect/read timeout of one HTTP attempt, in seconds."""

    def fetch(
        self,
        names: Sequence[str | Source],
        dest: str | Path | None = None,
        *,
        progress: bool = True,
        mirror: str | None = None,
        refresh: bool = False,
        trusted: Mapping[str, tuple[str, int]] | None = None,
        lease: FileLease | None = None,
        retrust: Collection[str] = (),
    ) -> list[DownloadResult]:
        """:func:`download_sources` with these settings (``mirror`` overrides the field;
        ``refresh`` fetches and verifies files again even when present; ``trusted``
        holds files without a published sha256 to their first verified download;
        ``lease`` is held on each file while it is fetched; ``retrust`` accepts a new
        download of the ones it names)."""
        return download_sources(
            names,
            dest,
            mirror=mirror or self.mirror,
            progress=progress,
            retries=self.retries,
            backoff=self.backoff_s,
            timeout=self.timeout_s,
            refresh=refresh,
            trusted=trusted,
            lease=lease,
            retrust=retrust,
        )
