"""The manifest of a stage folder: what the result *is*, apart from who produced it.

A committed stage folder ``<stage>/<key>/`` holds:

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

A folder is a usable result only when its files match the manifest (:func:`verify_files`):
every listed file is present with its size; small files are always re-hashed, large ones
when their mtime changed since the manifest was written or when ``verify="full"``. The
**digest** downstream keys use (:func:`content_digest`) hashes the files but not
``rows/`` (rows carry timestamps), so a recomputation that writes byte-identical files
keeps everything downstream cached.

Both stores (:mod:`tasks.store.folder`, :mod:`tasks.store.object_store`) build, write and
read manifests with the functions here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from gpt.fileio import sha256_file
from tasks.store.keys import sha256_json

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


def content_digest(files: dict[str, dict[str, Any]], data: dict[str, Any] | None = None) -> str:
    """Digest of a stage's result: the sha256 of its files except ``rows/`` (or of
    ``data`` for a stage without files)."""
    content = {
        rel: meta["sha256"] for rel, meta in files.items() if not rel.startswith(f"{ROWS_DIR}/")
    }
    return sha256_json({"files": content} if content else {"data": data})


def complete(
    stage: str, key: str, entries: dict[str, Any], files: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The full manifest of a folder being committed: the runner's ``entries`` (result,
    settings, inputs, code, rows, who and how) with the stage, key, files and digest,
    as it reads back from JSON."""
    full = {
        **entries,
        "version": MANIFEST_VERSION,
        "stage": stage,
        "key": key,
        "files": files,
        "digest": content_digest(files, entries.get("out")),
        "created_at": time.time(),
    }
    return json.loads(json.dumps(full, default=str))


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


def history_text(manifest: dict[str, Any]) -> str:
    """The ``manifest.json`` of a history entry: a replaced result's manifest without its
    file list (the entry keeps only the rows)."""
    return json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1, default=str)


def history_name(manifest: dict[str, Any]) -> str:
    """The folder name of a replaced result's history entry: its producer and time."""
    return f"{manifest['producer_run_id']}-{int(manifest['created_at'])}"


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


def read_manifest(folder: Path) -> dict[str, Any] | None:
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
