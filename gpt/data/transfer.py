"""Moving one file's bytes for :mod:`gpt.data.download`: the options a download runs with,
the mirror (a folder or an http(s) base URL laid out like the datasets folder), streaming
over HTTP with ``Range`` resume and a progress bar, copying from a local mirror, the
sidecar that records where a file came from, and checking an archive's listed members.

Each failure is a :class:`Failure` saying whether a retry can help; the caller decides
what to retry and what to tell the user.
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
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from tqdm.auto import tqdm

from gpt.data.archives import extract_to_temp, install_dir
from gpt.data.sources import SourceFile
from gpt.errors import ConfigError, DataError, UnsafeArchiveError
from gpt.fileio import sha256_file

log = logging.getLogger("gpt.data.download")

#: Environment variable naming a mirror (local folder or http(s) base URL).
MIRROR_ENV = "GPTFLOW_MIRROR"
_CHUNK = 1 << 16
MAX_BACKOFF_S = 30.0
_USER_AGENT = "gptflow/0.1 (+https://github.com/rasbt/LLMs-from-scratch inputs)"


@dataclass
class Failure(Exception):
    """One URL's failure (internal)."""

    detail: str
    retryable: bool = False
    kind: str = "network"  # network | http | checksum | archive | unsafe | missing
    attempts: int = 1

    def __str__(self) -> str:
        return self.detail


@dataclass
class Tried:
    url: str
    detail: str
    kind: str
    attempts: int = 1


@dataclass
class Mirror:
    raw: str
    base_url: str | None = None
    folder: Path | None = None

    def location(self, relpath: str) -> str:
        if self.base_url is not None:
            return self.base_url.rstrip("/") + "/" + quote(relpath, safe="/")
        assert self.folder is not None
        return str(self.folder / relpath)


#: A lease on one destination file, held while it is fetched (e.g.
#: :func:`tasks.store.lease.file_leases`): one writer per ``.part`` file across processes and
#: machines sharing the folder; the others wait, then find the file verified.
FileLease = Callable[[Path], AbstractContextManager[Any]]


@dataclass
class Options:
    retries: int
    backoff: float
    timeout: float
    progress: bool
    mirror: Mirror | None
    refresh: bool = False
    client: Any = None  # httpx.Client, created lazily
    lease: FileLease | None = None


def resolve_mirror(mirror: str | Path | None) -> Mirror | None:
    raw: str | Path | None = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if raw is None or str(raw) == "":
        return None
    text = str(raw)
    if re.match(r"^https?://", text, re.IGNORECASE):
        return Mirror(raw=text, base_url=text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(
            f"mirror folder {folder} (from {'--mirror' if mirror is not None else MIRROR_ENV}) "
            "does not exist; give a folder holding the inputs (datasets at the top, gpt2/...) "
            "or an http(s) base URL"
        )
    return Mirror(raw=text, folder=folder)


def sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.download.json")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def now() -> datetime:
    return datetime.now(UTC)


def client(opts: Options) -> Any:
    if opts.client is None:
        import httpx

        opts.client = httpx.Client(
            timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 15.0)),
            follow_redirects=True,
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
    return opts.client


def progress_bar(total: int | None, initial: int, desc: str, opts: Options) -> Any:
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


def fetch_http(url: str, part: Path, f: SourceFile, opts: Options) -> str:
    """Stream ``url`` into ``part`` (resuming it when it exists); return the sha256."""
    import httpx

    offset = part.stat().st_size if part.exists() else 0
    if f.size is not None and offset > f.size:
        unlink(part)
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    h = hashlib.sha256()
    written = 0
    total: int | None = None
    try:
        with client(opts).stream("GET", url, headers=headers) as r:
            if r.status_code == 416 and offset:
                unlink(part)
                raise Failure(
                    f"HTTP 416 for Range bytes={offset}- (stale partial file discarded)",
                    retryable=True,
                    kind="http",
                )
            if r.status_code >= 400:
                retry = r.status_code in (408, 425, 429) or r.status_code >= 500
                raise Failure(
                    f"HTTP {r.status_code} {r.reason_phrase}".rstrip(), retryable=retry, kind="http"
                )
            if offset and r.status_code == 206:
                m = re.match(r"bytes (\d+)-", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset:
                    unlink(part)
                    raise Failure(
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
            with open(part, mode) as out, progress_bar(total, offset, f.filename, opts) as bar:
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
                raise Failure(
                    f"connection cut after {offset + written:,} of {offset + expected:,} bytes",
                    retryable=True,
                )
    except httpx.TimeoutException as exc:
        raise Failure(
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
        raise Failure(f"connection failed: {msg}{hint}", retryable=True) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        of = f" of {total:,}" if total is not None else ""
        raise Failure(
            f"connection cut after {offset + written:,}{of} bytes ({exc or type(exc).__name__})",
            retryable=True,
        ) from exc
    except httpx.HTTPError as exc:
        raise Failure(f"{type(exc).__name__}: {exc}", retryable=False) from exc
    return h.hexdigest()


def fetch_local(src: Path, part: Path, f: SourceFile, opts: Options) -> str:
    """Copy a mirror folder's file into ``part``; return the sha256."""
    if not src.is_file():
        raise Failure(f"not found in the mirror folder (looked for {src})", kind="missing")
    h = hashlib.sha256()
    try:
        with (
            open(src, "rb") as fh,
            open(part, "wb") as out,
            progress_bar(src.stat().st_size, 0, f.filename, opts) as bar,
        ):
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise Failure(f"could not read mirror file: {exc}") from exc
    return h.hexdigest()


def verify_members(tmp: Path, f: SourceFile) -> list[Path]:
    out = []
    for m in f.members:
        p = tmp.joinpath(*PurePosixPath(m.name).parts)
        if not p.is_file():
            raise Failure(f"archive has no member {m.name!r}", kind="archive")
        if m.sha256 is not None:
            got = sha256_file(p)
            if got != m.sha256:
                raise Failure(
                    f"sha256 mismatch for archive member {m.name}: expected {m.sha256}, got {got}",
                    kind="checksum",
                )
        out.append(p.relative_to(tmp))
    return out


def candidates(f: SourceFile, opts: Options) -> list[tuple[str, str]]:
    """(kind, location) pairs to try, in order: the mirror alone, or the real URLs."""
    if opts.mirror is not None:
        kind = "http" if opts.mirror.base_url is not None else "local"
        return [(kind, opts.mirror.location(f.path))]
    return [("http", u) for u in f.urls]


def try_location(
    kind: str, loc: str, f: SourceFile, final: Path, part: Path, dest: Path, opts: Options
) -> tuple[str, int, tuple[Path, ...], int]:
    """Fetch + verify from one location with bounded retries. Returns (sha, bytes,
    extracted, attempts); raises Failure (with .attempts set) when it gives up."""
    attempts = 0
    fresh_retry_done = False
    while True:
        attempts += 1
        resumed = kind == "http" and part.exists() and part.stat().st_size > 0
        try:
            if kind == "http":
                sha = fetch_http(loc, part, f, opts)
            else:
                unlink(part)
                sha = fetch_local(Path(loc), part, f, opts)
            size = part.stat().st_size
            if f.size is not None and size != f.size:
                raise Failure(
                    f"size mismatch: expected {f.size:,} bytes, got {size:,}", kind="checksum"
                )
            if f.sha256 is not None and sha != f.sha256:
                raise Failure(f"sha256 mismatch: expected {f.sha256}, got {sha}", kind="checksum")
            extracted: tuple[Path, ...] = ()
            if f.is_archive:
                assert f.extract_to is not None
                target = dest / f.extract_to
                try:
                    tmp = extract_to_temp(part, target.parent, target.name, 4 << 30)
                except UnsafeArchiveError as exc:
                    raise Failure(str(exc), kind="unsafe") from exc
                except DataError as exc:
                    raise Failure(str(exc), kind="archive") from exc
                try:
                    rel = verify_members(tmp, f)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                install_dir(tmp, target)
                extracted = tuple(target / r for r in rel)
            return sha, size, extracted, attempts
        except Failure as fail:
            fail.attempts = attempts
            if fail.kind in ("checksum", "archive", "unsafe"):
                unlink(part)  # never keep bytes that failed verification
                if resumed and not fresh_retry_done:
                    # The bad bytes may come from mixing a stale partial file: retry once fresh.
                    log.warning("%s: %s after a resume; retrying from scratch", loc, fail.detail)
                    fresh_retry_done = True
                    continue
                raise
            if not fail.retryable or attempts >= opts.retries:
                raise
            delay = min(opts.backoff * (2 ** (attempts - 1)), MAX_BACKOFF_S)
            log.warning(
                "%s: %s; retry %d/%d in %.1f s", loc, fail.detail, attempts, opts.retries - 1, delay
            )
            time.sleep(delay)


def advice(
    source: str, f: SourceFile, tried: list[Tried], opts: Options, part: Path, tofu: bool
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
                f"it beside the file in {sidecar(Path(f.path)).as_posix()}, in the catalog's "
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
