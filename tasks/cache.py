"""Content-addressed stage folders: keys, manifests, verification, atomic commits.

A stage's **key** hashes the stage name, the settings that shape its result, the
*content digests* of its inputs, the fingerprint of the code it runs and the versions of
the third-party packages that code imports (:mod:`tasks.fingerprint`), and the sha256 of
the files it reads from the datasets folder (:class:`KeyParts`). Its result lives in
``<root>/<stage>/<key>/``:

- the stage's files (checkpoints, token files, plots, JSON exports),
- ``rows/<table>.parquet``: the catalog rows the stage produced (the catalog is an index
  of these folders and can be rebuilt from them),
- ``produced.json``: the record of who computed it, when, where and how fast — the
  producing run (and the run that resumed it), times, the device, the settings it ran
  with, the measured fields of its result, the rows, the files' mtimes,
- ``manifest.json``, written last: what the result *is* — the stage, key, code, the
  settings that shaped it, its inputs' digests, its typed result and the size and sha256
  of every other file (rows and ``produced.json`` aside). Two computations of one key —
  two runs, or a run killed and resumed — write it byte for byte the same.

A folder counts as a cache hit only when its manifest verifies (:meth:`StageStore.lookup`):
every listed file is present with its size; small files are always re-hashed, large
ones when their mtime changed since the manifest was written or when ``verify="full"``.
The **digest** downstream keys use hashes the files but not ``rows/`` (rows carry
timestamps), so a recomputation that writes byte-identical files keeps everything
downstream cached.

Work happens in ``<key>.<owner>.partial/``, named by the lease of the run computing it
(:mod:`tasks.lease`); it is kept after a crash so training resumes (the next holder of
the lease takes it over by renaming it) and is renamed into place only when complete,
by a run that still holds the lease.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpt.fileio import sha256_file
from gpt.paths import artifacts_dir, is_remote, local_path, url_protocol
from tasks.lease import Lease, LeaseBase, LeaseLost

if TYPE_CHECKING:
    from tasks.object_lease import ObjectLease

MANIFEST = "manifest.json"
PRODUCED = "produced.json"
MANIFEST_VERSION = 3
#: Manifest versions still read: 2 kept everything in ``manifest.json``.
READABLE_VERSIONS = (2, MANIFEST_VERSION)
ROWS_DIR = "rows"
#: Manifest entries that record who computed a result, when, where and how fast — not
#: what it is: they go to ``produced.json``.
RECORD_KEYS = frozenset(
    {"producer_run_id", "resumed_by_run_id", "created_at", "wall_s", "device", "cpu_threads",
     "rows", "measured", "run_args"}
)  # fmt: skip
#: Entries of a file's description that are records (when it was written, an upload's
#: ETag); its size and sha256 are content.
RECORD_FILE_KEYS = frozenset({"mtime_ns", "etag"})
#: Files of a stage folder bigger than this are re-hashed only when their size or mtime
#: changed since the manifest was written, or with ``verify="full"``.
SMALL_FILE_BYTES = 16 * 1024 * 1024

Verify = Literal["auto", "full"]


def stable_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def split_manifest(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(content, record)``: what ``manifest.json`` and ``produced.json`` hold of a full
    manifest (module docstring); :func:`merge_manifest` is the inverse."""
    content: dict[str, Any] = {}
    record: dict[str, Any] = {}
    for k, v in manifest.items():
        if k in RECORD_KEYS:
            record[k] = v
        elif k == "files":
            content["files"], record["files"] = {}, {}
            for rel, meta in v.items():
                if rel.startswith(f"{ROWS_DIR}/"):  # rows carry run ids and times
                    record["files"][rel] = meta
                    continue
                content["files"][rel] = {a: b for a, b in meta.items() if a not in RECORD_FILE_KEYS}
                when = {a: b for a, b in meta.items() if a in RECORD_FILE_KEYS}
                if when:
                    record["files"][rel] = when
        elif k == "inputs":
            content["inputs"], record["input_runs"] = {}, {}
            for name, inp in v.items():
                if isinstance(inp, dict):
                    content["inputs"][name] = {a: b for a, b in inp.items() if a != "run_id"}
                    record["input_runs"][name] = inp.get("run_id")
                else:
                    content["inputs"][name] = inp
        else:
            content[k] = v
    return content, record


def merge_manifest(content: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The full manifest from its two files (the inverse of :func:`split_manifest`)."""
    full = {**content, **{k: v for k, v in record.items() if k in RECORD_KEYS}}
    files = {rel: dict(meta) for rel, meta in content.get("files", {}).items()}
    for rel, meta in (record.get("files") or {}).items():
        files.setdefault(rel, {}).update(meta)
    full["files"] = files
    if "inputs" in content:
        runs = record.get("input_runs") or {}
        full["inputs"] = {
            name: {**inp, "run_id": runs.get(name)} if isinstance(inp, dict) else inp
            for name, inp in content["inputs"].items()
        }
    return full


def manifest_texts(manifest: dict[str, Any]) -> tuple[str, str]:
    """The texts of ``manifest.json`` and ``produced.json`` for a full manifest."""
    content, record = split_manifest(manifest)
    return (
        json.dumps(content, indent=1, sort_keys=True, default=str) + "\n",
        json.dumps(record, indent=1, sort_keys=True, default=str) + "\n",
    )


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write a full manifest into ``folder``: ``produced.json``, then ``manifest.json``
    (the mark of a complete folder), each by atomic rename."""
    content, record = manifest_texts(manifest)
    for name, text in ((PRODUCED, record), (MANIFEST, content)):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)


def parse_manifest(content: bytes | str, record: bytes | str | None) -> dict[str, Any] | None:
    """The full manifest from the bytes of ``manifest.json`` and ``produced.json`` (None
    when they are unreadable or of an unknown version)."""
    try:
        manifest = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS:
        return None
    if manifest["version"] != MANIFEST_VERSION:
        return manifest  # one file held everything
    try:
        produced = json.loads(record) if record is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return merge_manifest(manifest, produced) if isinstance(produced, dict) else None


def content_digest(files: dict[str, dict[str, Any]], data: dict[str, Any] | None = None) -> str:
    """Digest of a stage's result: the sha256 of its files except ``rows/`` (or of
    ``data`` for a stage without files)."""
    content = {
        rel: meta["sha256"] for rel, meta in files.items() if not rel.startswith(f"{ROWS_DIR}/")
    }
    payload = {"files": content} if content else {"data": data}
    return hashlib.sha256(stable_json(payload).encode()).hexdigest()


def _short(value: Any) -> str:
    return hashlib.sha256(stable_json(value).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeyParts:
    """Everything a stage's key hashes, part by part, so that a recomputation can say
    which part changed (:func:`key_changes`)."""

    stage: str
    settings: dict[str, Any]
    """The settings that shape the result (:meth:`gpt.config.Args.key_dict`)."""
    inputs: dict[str, str | None]
    """Upstream stage -> the content digest of its result."""
    code: str
    """The fingerprint of the code the stage runs."""
    packages: dict[str, str | None] = field(default_factory=dict)
    """Distribution -> version of the third-party packages that code imports."""
    files: dict[str, str] = field(default_factory=dict)
    """Path under the datasets folder -> sha256 of each file the stage reads there."""

    @property
    def key(self) -> str:
        """The cache key (24 hex characters)."""
        payload = {
            "stage": self.stage,
            "settings": self.settings,
            "inputs": self.inputs,
            "code": self.code,
            "packages": self.packages,
            "files": self.files,
        }
        return hashlib.sha256(stable_json(payload).encode()).hexdigest()[:24]

    def summary(self) -> dict[str, Any]:
        """The parts as kept in the manifest and the stage's outputs: settings as a short
        digest, the others as they are (small)."""
        return {
            "settings": _short(self.settings),
            "inputs": self.inputs,
            "code": self.code[:16],
            "packages": self.packages,
            "files": self.files,
        }


#: The key's parts as :func:`key_changes` names them.
KEY_PART_NAMES = {
    "settings": "settings",
    "inputs": "inputs",
    "code": "code",
    "packages": "packages",
    "files": "input files",
}


def key_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two :meth:`KeyParts.summary` values, one phrase per changed
    part, e.g. ``"packages (scikit-learn 1.4.2 -> 1.5.0)"`` or ``"inputs (tokenize)"``.
    A part the older summary lacks counts as unchanged (it was not recorded then)."""
    out = []
    for part, label in KEY_PART_NAMES.items():
        if part not in before or before[part] == after.get(part):
            continue
        old, new = before[part], after.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if part == "packages":
                names = [f"{k} {old.get(k) or 'absent'} -> {new.get(k) or 'absent'}" for k in names]
            out.append(f"{label} ({', '.join(names)})")
        else:
            out.append(label)
    return out


@dataclass
class StageOutput:
    """A finished stage as downstream stages see it: where its folder is, who produced
    it, the digest of its content, and its typed result (``out``; ``data`` is the same
    as a plain dict). Paths in ``out`` are relative to ``root``: use :meth:`path`."""

    stage: str
    key: str
    root: str
    run_id: str
    """The run that computed this result (its catalog rows are stored under it)."""
    digest: str = ""
    out: Any = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_hit: bool = False
    created_at: float = 0.0

    def path(self, rel: str) -> Path:
        """Absolute path of a file or folder of this stage."""
        return Path(self.root) / rel

    @property
    def data(self) -> dict[str, Any]:
        """The typed result as a plain JSON-able dict."""
        if self.out is None:
            return {}
        if hasattr(self.out, "model_dump"):
            return self.out.model_dump(mode="json")
        return dict(self.out)


def _walk(folder: Path) -> list[str]:
    """Relative paths of every file under ``folder``, except the manifest, the record of
    who produced it and the runner's own dot-files at the top level (owner marker,
    partial rows, leases)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel in (MANIFEST, PRODUCED) or rel.startswith("."):
            continue
        out.append(rel)
    return out


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{rel: {bytes, mtime_ns, sha256}}`` for every file of a stage folder."""
    files = {}
    for rel in _walk(folder):
        p = folder / rel
        st = p.stat()
        files[rel] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
    return files


def verify_files(
    folder: Path, files: dict[str, dict[str, Any]], verify: Verify = "auto"
) -> str | None:
    """None when every file matches its manifest entry, else the first problem in words."""
    for rel, meta in sorted(files.items()):
        p = folder / rel
        try:
            st = p.stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != meta["bytes"]:
            return f"{rel} has {st.st_size} bytes, the manifest says {meta['bytes']}"
        rehash = (
            verify == "full"
            or st.st_size <= SMALL_FILE_BYTES
            or st.st_mtime_ns != meta.get("mtime_ns")
        )
        if rehash and sha256_file(p) != meta["sha256"]:
            return f"{rel} was changed (sha256 differs from the manifest)"
    extra = sorted(set(_walk(folder)) - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest"
    return None


class StageStore:
    """Stage folders under ``root`` (default ``artifacts/stages``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else artifacts_dir() / "stages"

    def final_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str, lease: LeaseBase) -> Path:
        """Where the holder of ``lease`` computes; kept across crashes so training can
        resume. Named by the holder: a run whose lease was broken no longer finds it."""
        return self.root / stage / f"{key}.{lease.owner}.partial"

    def published(self, stage: str, key: str) -> str | None:
        """Where the folder is published when that is not :meth:`final_dir` (the URL on an
        object store); None here."""
        return None

    def lease(self, stage: str, key: str, run_id: str) -> Lease | ObjectLease:
        """The lease that makes one run at a time compute ``key`` (:mod:`tasks.lease`)."""
        return Lease(self.root / stage / f"{key}.lease", run_id)

    def read_manifest(self, folder: Path) -> dict[str, Any] | None:
        """The full manifest of ``folder`` (both files), or None when unreadable."""
        try:
            content = (folder / MANIFEST).read_bytes()
        except OSError:
            return None
        try:
            record = (folder / PRODUCED).read_bytes()
        except OSError:
            record = None
        return parse_manifest(content, record)

    def lookup(
        self, stage: str, key: str, verify: Verify = "auto"
    ) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, None)`` for a complete, verified result; ``(None, reason)`` when
        there is none (reason None) or it is incomplete/damaged (reason says what)."""
        folder = self.final_dir(stage, key)
        if not folder.exists():
            return None, None
        manifest = self.read_manifest(folder)
        if manifest is None:
            return None, f"{folder / MANIFEST} is missing or unreadable"
        problem = verify_files(folder, manifest.get("files", {}), verify)
        if problem is not None:
            return None, problem
        return manifest, None

    def fresh_work_dir(self, stage: str, key: str, lease: LeaseBase, *, resume: bool) -> Path:
        """The work dir of the holder of ``lease``: with ``resume``, the folder of the
        latest earlier attempt (a crashed run, or one whose lease was broken) taken over
        by renaming it; otherwise empty. Other earlier folders are removed."""
        work = self.work_dir(stage, key, lease)
        folder = self.root / stage
        earlier = [*folder.glob(f"{key}.*.partial"), *folder.glob(f"{key}.partial")]
        earlier = sorted((p for p in earlier if p != work), key=_mtime, reverse=True)
        for old in earlier:
            with contextlib.suppress(FileNotFoundError):
                if resume and not work.exists():
                    os.rename(old, work)
                    continue
                trash = old.with_name(f"{key}.old-{uuid.uuid4().hex[:12]}")
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        return work

    def held_work_dir(self, stage: str, key: str, lease: LeaseBase) -> Path:
        """The work dir of ``lease``'s holder, checked before publishing it: raises
        :class:`LeaseLost` when the lease is no longer this run's, or when the next
        holder took the folder over (renamed it) — then that run's result stands."""
        lease.confirm()
        work = self.work_dir(stage, key, lease)
        if not work.is_dir():
            raise LeaseLost(
                f"the work folder {work} was taken over by the next holder of the lease "
                f"{lease.where} (this run stalled past the lease TTL); it must not publish"
            )
        return work

    def commit(
        self, stage: str, key: str, manifest: dict[str, Any], lease: LeaseBase
    ) -> dict[str, Any]:
        """Describe every file of the work dir, write the manifest last, and rename the
        work dir into place (replacing an older or damaged copy). Returns the manifest.
        Refuses (:class:`LeaseLost`) when this run no longer holds ``lease``."""
        try:
            return self._commit(stage, key, manifest, lease)
        except FileNotFoundError:  # the folder vanished: taken over by the next holder?
            self.held_work_dir(stage, key, lease)
            raise

    def _commit(
        self, stage: str, key: str, manifest: dict[str, Any], lease: LeaseBase
    ) -> dict[str, Any]:
        work = self.held_work_dir(stage, key, lease)
        final = self.final_dir(stage, key)
        files = describe_files(work)
        manifest = {
            **manifest,
            "version": MANIFEST_VERSION,
            "stage": stage,
            "key": key,
            "files": files,
            "digest": content_digest(files, manifest.get("out")),
            "created_at": time.time(),
        }
        write_manifest(work, manifest)
        self.held_work_dir(stage, key, lease)
        if final.exists():
            self._keep_history(stage, key, final)
            trash = final.with_name(f"{key}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(final, trash)
            try:
                os.replace(work, final)
            except FileNotFoundError:  # taken over since the check: leave things as found
                os.replace(trash, final)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, final)
        return manifest

    def history_dir(self, stage: str, key: str) -> Path:
        """Where the rows of results this key's folder replaced are kept."""
        return self.root / stage / f"{key}.history"

    def _keep_history(self, stage: str, key: str, final: Path) -> None:
        """A recomputation (forced, or of a damaged folder) replaces a result another run
        produced; that run's catalog rows stay history, so keep their Parquet files and
        manifest (not the large files) for ``gptflow catalog rebuild``."""
        old = self.read_manifest(final)
        if old is None or not old.get("rows"):
            return
        dest = self.history_dir(stage, key) / f"{old['producer_run_id']}-{int(old['created_at'])}"
        if dest.exists():
            return
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / ROWS_DIR).is_dir():
            shutil.copytree(final / ROWS_DIR, tmp / ROWS_DIR)
        else:
            tmp.mkdir(parents=True)
        (tmp / MANIFEST).write_text(
            json.dumps({k: v for k, v in old.items() if k != "files"}, indent=1, default=str)
        )
        os.replace(tmp, dest)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def open_stage_store(artifacts: str | Path) -> StageStore:
    """The stage store of an artifacts root: ``<root>/stages`` in a local folder, or on
    an object store (``s3://…``, :mod:`tasks.remote_store`)."""
    if is_remote(artifacts):
        from tasks.remote_store import ObjectStageStore

        return ObjectStageStore(str(artifacts))
    return StageStore(local_root(artifacts) / "stages")


def local_root(artifacts: str | Path) -> Path:
    """A local artifacts root as a path (a ``file://`` URL's path; a plain path as is)."""
    if url_protocol(str(artifacts)) in ("file", "local"):
        return local_path(artifacts)
    return Path(artifacts)


def root_child(artifacts: str | Path, name: str) -> str | Path:
    """``<root>/<name>``: an URL for an object-store root, else a local path."""
    if is_remote(artifacts):
        return f"{str(artifacts).rstrip('/')}/{name}"
    return local_root(artifacts) / name
