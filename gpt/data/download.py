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
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from tqdm.auto import tqdm

from gpt import paths
from gpt.config import Args, operational
from gpt.data.archives import extract_to_temp, install_dir
from gpt.data.sources import SOURCES, Source, SourceFile
from gpt.data.trust import held_to, retrust_paths, trust_records
from gpt.errors import (
    ChecksumError,
    ConfigError,
    DataError,
    DownloadError,
    UnsafeArchiveError,
)
from gpt.fileio import sha256_file

log = logging.getLogger(__name__)

#: Environment variable naming a mirror (local folder or http(s) base URL).
MIRROR_ENV = "GPTFLOW_MIRROR"
_CHUNK = 1 << 16
_MAX_BACKOFF_S = 30.0
_USER_AGENT = "gptflow/0.1 (+https://github.com/rasbt/LLMs-from-scratch inputs)"


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


# --------------------------------------------------------------------------- helpers


@dataclass
class _Failure(Exception):
    """One URL's failure (internal)."""

    detail: str
    retryable: bool = False
    kind: str = "network"  # network | http | checksum | archive | unsafe | missing
    attempts: int = 1

    def __str__(self) -> str:
        return self.detail


@dataclass
class _Tried:
    url: str
    detail: str
    kind: str
    attempts: int = 1


@dataclass
class _Mirror:
    raw: str
    base_url: str | None = None
    folder: Path | None = None

    def location(self, relpath: str) -> str:
        if self.base_url is not None:
            return self.base_url.rstrip("/") + "/" + quote(relpath, safe="/")
        assert self.folder is not None
        return str(self.folder / relpath)


#: A lease on one destination file, held while it is fetched (e.g.
#: :func:`tasks.lease.file_leases`): one writer per ``.part`` file across processes and
#: machines sharing the folder; the others wait, then find the file verified.
FileLease = Callable[[Path], AbstractContextManager[Any]]


@dataclass
class _Options:
    retries: int
    backoff: float
    timeout: float
    progress: bool
    mirror: _Mirror | None
    refresh: bool = False
    client: Any = None  # httpx.Client, created lazily
    lease: FileLease | None = None


def _resolve_mirror(mirror: str | Path | None) -> _Mirror | None:
    raw: str | Path | None = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if raw is None or str(raw) == "":
        return None
    text = str(raw)
    if re.match(r"^https?://", text, re.IGNORECASE):
        return _Mirror(raw=text, base_url=text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(
            f"mirror folder {folder} (from {'--mirror' if mirror is not None else MIRROR_ENV}) "
            "does not exist; give a folder holding the inputs (datasets at the top, gpt2/...) "
            "or an http(s) base URL"
        )
    return _Mirror(raw=text, folder=folder)


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.download.json")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- fetching


def _client(opts: _Options) -> Any:
    if opts.client is None:
        import httpx

        opts.client = httpx.Client(
            timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 15.0)),
            follow_redirects=True,
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
    return opts.client


def _bar(total: int | None, initial: int, desc: str, opts: _Options) -> Any:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not opts.progress,
        leave=False,
    )


def _fetch_http(url: str, part: Path, f: SourceFile, opts: _Options) -> str:
    """Stream ``url`` into ``part`` (resuming it when it exists); return the sha256."""
    import httpx

    offset = part.stat().st_size if part.exists() else 0
    if f.size is not None and offset > f.size:
        _unlink(part)
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    h = hashlib.sha256()
    written = 0
    total: int | None = None
    try:
        with _client(opts).stream("GET", url, headers=headers) as r:
            if r.status_code == 416 and offset:
                _unlink(part)
                raise _Failure(
                    f"HTTP 416 for Range bytes={offset}- (stale partial file discarded)",
                    retryable=True,
                    kind="http",
                )
            if r.status_code >= 400:
                retry = r.status_code in (408, 425, 429) or r.status_code >= 500
                raise _Failure(
                    f"HTTP {r.status_code} {r.reason_phrase}".rstrip(), retryable=retry, kind="http"
                )
            if offset and r.status_code == 206:
                m = re.match(r"bytes (\d+)-", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset:
                    _unlink(part)
                    raise _Failure(
                        f"bad Content-Range {r.headers.get('content-range')!r} for resume at "
                        f"{offset}; partial file discarded",
                        retryable=True,
                    )
                log.info("%s: resuming at byte %d", f.path, offset)
                with open(part, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                mode = "ab"
            else:
                if offset:
                    log.info(
                        "%s: server ignored Range (HTTP %d); restarting", f.path, r.status_code
                    )
                offset = 0
                mode = "wb"
            length = r.headers.get("content-length")
            encoded = r.headers.get("content-encoding", "identity").lower() not in ("", "identity")
            expected = int(length) if (length and length.isdigit() and not encoded) else None
            total = offset + expected if expected is not None else f.size
            with open(part, mode) as out, _bar(total, offset, f.filename, opts) as bar:
                try:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                finally:
                    out.flush()
                    os.fsync(out.fileno())
            if expected is not None and written != expected:
                raise _Failure(
                    f"connection cut after {offset + written:,} of {offset + expected:,} bytes",
                    retryable=True,
                )
    except httpx.TimeoutException as exc:
        raise _Failure(
            f"timeout after {opts.timeout:g} s ({type(exc).__name__}"
            + (f", {offset + written:,} bytes received" if written else "")
            + ")",
            retryable=True,
        ) from exc
    except httpx.ConnectError as exc:
        msg = str(exc) or type(exc).__name__
        hint = (
            " (SSL certificate problem: update certifi or set SSL_CERT_FILE)"
            if "CERTIFICATE" in msg.upper()
            else ""
        )
        raise _Failure(f"connection failed: {msg}{hint}", retryable=True) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        of = f" of {total:,}" if total is not None else ""
        raise _Failure(
            f"connection cut after {offset + written:,}{of} bytes ({exc or type(exc).__name__})",
            retryable=True,
        ) from exc
    except httpx.HTTPError as exc:
        raise _Failure(f"{type(exc).__name__}: {exc}", retryable=False) from exc
    return h.hexdigest()


def _fetch_local(src: Path, part: Path, f: SourceFile, opts: _Options) -> str:
    """Copy a mirror folder's file into ``part``; return the sha256."""
    if not src.is_file():
        raise _Failure(f"not found in the mirror folder (looked for {src})", kind="missing")
    h = hashlib.sha256()
    try:
        with (
            open(src, "rb") as fh,
            open(part, "wb") as out,
            _bar(src.stat().st_size, 0, f.filename, opts) as bar,
        ):
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise _Failure(f"could not read mirror file: {exc}") from exc
    return h.hexdigest()


def _verify_members(tmp: Path, f: SourceFile) -> list[Path]:
    out = []
    for m in f.members:
        p = tmp.joinpath(*PurePosixPath(m.name).parts)
        if not p.is_file():
            raise _Failure(f"archive has no member {m.name!r}", kind="archive")
        if m.sha256 is not None:
            got = sha256_file(p)
            if got != m.sha256:
                raise _Failure(
                    f"sha256 mismatch for archive member {m.name}: expected {m.sha256}, got {got}",
                    kind="checksum",
                )
        out.append(p.relative_to(tmp))
    return out


def _present(f: SourceFile, dest: Path) -> FileResult | None:
    """A FileResult when ``f`` is already present and verified in ``dest``, else None."""
    final = dest / f.path
    rec = _read_sidecar(final)
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
    fetched = _now()
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


def _candidates(f: SourceFile, opts: _Options) -> list[tuple[str, str]]:
    """(kind, location) pairs to try, in order: the mirror alone, or the real URLs."""
    if opts.mirror is not None:
        kind = "http" if opts.mirror.base_url is not None else "local"
        return [(kind, opts.mirror.location(f.path))]
    return [("http", u) for u in f.urls]


def _try_location(
    kind: str, loc: str, f: SourceFile, final: Path, part: Path, dest: Path, opts: _Options
) -> tuple[str, int, tuple[Path, ...], int]:
    """Fetch + verify from one location with bounded retries. Returns (sha, bytes,
    extracted, attempts); raises _Failure (with .attempts set) when it gives up."""
    attempts = 0
    fresh_retry_done = False
    while True:
        attempts += 1
        resumed = kind == "http" and part.exists() and part.stat().st_size > 0
        try:
            if kind == "http":
                sha = _fetch_http(loc, part, f, opts)
            else:
                _unlink(part)
                sha = _fetch_local(Path(loc), part, f, opts)
            size = part.stat().st_size
            if f.size is not None and size != f.size:
                raise _Failure(
                    f"size mismatch: expected {f.size:,} bytes, got {size:,}", kind="checksum"
                )
            if f.sha256 is not None and sha != f.sha256:
                raise _Failure(f"sha256 mismatch: expected {f.sha256}, got {sha}", kind="checksum")
            extracted: tuple[Path, ...] = ()
            if f.is_archive:
                assert f.extract_to is not None
                target = dest / f.extract_to
                try:
                    tmp = extract_to_temp(part, target.parent, target.name, 4 << 30)
                except UnsafeArchiveError as exc:
                    raise _Failure(str(exc), kind="unsafe") from exc
                except DataError as exc:
                    raise _Failure(str(exc), kind="archive") from exc
                try:
                    rel = _verify_members(tmp, f)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                install_dir(tmp, target)
                extracted = tuple(target / r for r in rel)
            return sha, size, extracted, attempts
        except _Failure as fail:
            fail.attempts = attempts
            if fail.kind in ("checksum", "archive", "unsafe"):
                _unlink(part)  # never keep bytes that failed verification
                if resumed and not fresh_retry_done:
                    # The bad bytes may come from mixing a stale partial file: retry once fresh.
                    log.warning("%s: %s after a resume; retrying from scratch", loc, fail.detail)
                    fresh_retry_done = True
                    continue
                raise
            if not fail.retryable or attempts >= opts.retries:
                raise
            delay = min(opts.backoff * (2 ** (attempts - 1)), _MAX_BACKOFF_S)
            log.warning(
                "%s: %s; retry %d/%d in %.1f s", loc, fail.detail, attempts, opts.retries - 1, delay
            )
            time.sleep(delay)


def _advice(
    source: str, f: SourceFile, tried: list[_Tried], opts: _Options, part: Path, tofu: bool
) -> str:
    lines = [f"could not fetch {f.path!r} of source {source!r}; every location failed:"]
    for t in tried:
        extra = f" (after {t.attempts} attempts)" if t.attempts > 1 else ""
        lines.append(f"  - {t.url}: {t.detail}{extra}")
    if part.exists():
        lines.append(
            f"A partial download is kept at {part} and resumed next time "
            "(it is never used before it is verified)."
        )
    else:
        lines.append("No file was kept.")
    if any(t.kind == "checksum" for t in tried):
        lines.append(
            "The bytes received differ from the expected ones: the upstream file may have "
            "changed, or a proxy altered the transfer."
        )
        if tofu:
            lines.append(
                "No published sha256 exists for this file: the expected one is the sha256 "
                "recorded at its first verified download (trust on first use; gptflow keeps "
                f"it beside the file in {_sidecar(Path(f.path)).as_posix()}, in the catalog's "
                f"sources table as {source}:{f.path} and in the run records), and a later "
                "download that differs is refused. If the upstream file was replaced on "
                f"purpose, accept it with `--retrust {source}` (gptflow download or gptflow "
                "run): it is fetched again and its new digest recorded."
            )
    if opts.mirror is not None:
        where = opts.mirror.location(f.path)
        lines.append(
            f"Mirror-only mode (mirror {opts.mirror.raw!r} from --mirror/{MIRROR_ENV}): the "
            f"real URLs were not tried. What to do: put the file at {where} (same name as the "
            f"remote URL's last path segment), or drop --mirror / unset {MIRROR_ENV} to "
            f"download from {', '.join(f.urls) or 'the remote URLs'}."
        )
    else:
        lines.append(
            "What to do: check the internet connection / proxy and retry later (these hosts "
            f"are sometimes down), or fetch the file elsewhere and set {MIRROR_ENV} (or "
            f"--mirror) to a folder or http(s) base URL holding {f.path!r} (datasets at the "
            "top, gpt2/encoder.json, gpt2/vocab.bpe, gpt2/<size>/<file>)."
        )
    return "\n".join(lines)


def _with_trusted(
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
    records = trust_records(f, trusted, _read_sidecar(final), str(_sidecar(final)))
    return held_to(source, f, records, retrust)


def _stat_verified(held: SourceFile, final: Path) -> bool:
    """True when ``final`` is absent, or is the file its download record describes (same
    size and mtime) and that record holds ``held``'s digest: no hashing needed."""
    try:
        st = final.stat()
    except FileNotFoundError:
        return True
    rec = _read_sidecar(final) or {}
    return (
        rec.get("sha256") == held.sha256
        and rec.get("bytes") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
    )


def _changed_here(held: SourceFile, dest: Path) -> str | None:
    """The sha256 of the file in ``dest`` when it is present and differs from the digest
    ``held`` is held to (changed since its verified download), else None."""
    final = dest / held.path
    if _stat_verified(held, final):
        return None
    sha = sha256_file(final)
    return None if sha == held.sha256 else sha


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
    resolved = _resolve(names, sources)
    out_dir = Path(dest).expanduser().resolve() if dest is not None else paths.datasets_dir()
    again = (
        retrust_paths(retrust, [*resolved, *(sources or SOURCES).values()]) if retrust else set()
    )
    out: dict[str, str | None] = {}
    for src in resolved:
        for f in src.files:
            held, tofu = _with_trusted(src.name, f, out_dir, trusted, again)
            known = not held.is_archive and f.path not in again
            if tofu and not _stat_verified(held, out_dir / f.path):
                known = False
            out[f.path] = held.sha256 if known else None
    return out


def _resolve(names: Iterable[str | Source], sources: Mapping[str, Source] | None) -> list[Source]:
    registry = SOURCES if sources is None else sources
    resolved: list[Source] = []
    for n in names:
        if isinstance(n, Source):
            resolved.append(n)
        elif n in registry:
            resolved.append(registry[n])
        else:
            raise ConfigError(f"unknown source {n!r}; known sources: {', '.join(registry)}")
    return resolved


def _ensure_file(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: _Options,
    tofu: bool = False,
    again: bool = False,
) -> FileResult:
    """The file present and verified, else fetched under its lease (``opts.lease``; a
    run that waited there finds the file the other one fetched)."""
    found = None if opts.refresh or again else _present(f, dest)
    if found is not None:
        log.info("%s: present and verified, skipping", found.path)
        return found
    if opts.lease is None:
        return _fetch_file(source, f, dest, opts, tofu, again)
    with opts.lease(dest / f.path):
        return _fetch_file(source, f, dest, opts, tofu, again)


def _fetch_file(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: _Options,
    tofu: bool = False,
    again: bool = False,
) -> FileResult:
    found = None if opts.refresh or again else _present(f, dest)
    if found is not None:
        log.info("%s: present and verified, skipping", found.path)
        return found
    final = dest / f.path
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    tried: list[_Tried] = []
    candidates = _candidates(f, opts)
    for idx, (kind, loc) in enumerate(candidates):
        log.info("fetching %s from %s", f.path, loc)
        try:
            sha, size, extracted, _ = _try_location(kind, loc, f, final, part, dest, opts)
        except _Failure as fail:
            tried.append(_Tried(loc, fail.detail, fail.kind, fail.attempts))
            log.warning("%s: %s", loc, fail.detail)
            if fail.kind not in ("network", "http"):
                _unlink(part)
            elif idx < len(candidates) - 1:
                _unlink(part)  # the next URL may serve other bytes: do not resume across hosts
            continue
        os.replace(part, final)
        st = final.stat()
        fetched = _now()
        _write_json_atomic(
            _sidecar(final),
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
    msg = _advice(source, f, tried, opts, part, tofu)
    if any(t.kind == "unsafe" for t in tried):
        raise UnsafeArchiveError(msg)
    if tried and all(t.kind == "checksum" for t in tried):
        raise ChecksumError(msg)
    raise DownloadError(msg)


def _ensure_held(
    source: str,
    f: SourceFile,
    dest: Path,
    opts: _Options,
    trusted: Mapping[str, tuple[str, int]] | None,
    again: bool,
) -> FileResult:
    """:func:`_ensure_file` for a file held to its published or trusted digest. A file
    trusted on first use that was changed in ``dest`` since its verified download is
    refused (never fetched over, never used) unless ``again`` (``--retrust``) accepts it
    as it is; ``again`` on an unchanged or absent file fetches it and accepts the bytes."""
    try:
        held, tofu = _with_trusted(source, f, dest, trusted)
    except ChecksumError:
        if not again:
            raise
        held, tofu = f, False  # the records disagree: --retrust settles it
    local = _changed_here(held, dest) if tofu and not opts.refresh else None
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
    accepted = _now()
    _write_json_atomic(
        _sidecar(final),
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
    resolved = _resolve(names, sources)
    again = (
        retrust_paths(retrust, [*resolved, *(sources or SOURCES).values()]) if retrust else set()
    )
    out_dir = Path(dest).expanduser().resolve() if dest is not None else paths.datasets_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = _Options(
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        progress=progress,
        mirror=_resolve_mirror(mirror),
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
