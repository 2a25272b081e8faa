"""The code part of a stage's cache key, derived from what the stage imports.

A stage's fingerprint hashes the source of its own module and of every project module it
imports, transitively — at module level or inside functions (lazy imports count), since
:mod:`ast` sees them all. Nothing is listed by hand, so the key cannot drift from the
code: editing any module a stage can run changes its key, while modules it never
imports (the run report, the command line) leave it alone.

Only the project's own packages are followed and hashed. Third-party code enters the
key by version (:func:`package_versions`): the distributions of the top-level modules
that the stage's *library* modules (``gpt.*``) import, derived from the same parse, so
upgrading scikit-learn changes the keys of the stages whose library code imports it and
no others. The ``tasks`` wrappers only orchestrate and store a result (Prefect, DuckDB,
fsspec), so their imports do not shape it and stay out of the key.

A new process does not re-read an unchanged tree: each file's digest and imports are kept
on disk (:class:`StatCache`, under :func:`gpt.paths.cache_dir`) with the file's size,
``mtime_ns`` and inode, and reused while all three match — any edit changes at least the
mtime. An entry written less than :data:`RACY_S` after its file's mtime is not trusted
(an edit within the clock's granularity could keep size and mtime), as git does for
"racily clean" files. The installed distributions are kept the same way, keyed by the
mtimes of the ``site-packages`` folders on ``sys.path`` (installing, upgrading or
removing a distribution adds or removes a ``.dist-info`` folder there).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Top-level packages whose modules are followed and hashed.
PROJECT_PACKAGES = ("gpt", "tasks")

#: The project packages that compute results (the library): the third-party packages
#: their modules import are the ones whose versions enter a stage's key.
LIBRARY_PACKAGES = ("gpt",)

#: The checkout holding those packages.
SOURCE_ROOT = Path(__file__).resolve().parents[2]

#: ``ast.parse`` is not thread-safe in CPython before 3.13 (gh-106905: a thread switch
#: inside it breaks its recursion bookkeeping, "SystemError: AST constructor recursion
#: depth mismatch"), and a flow computes the keys of parallel stages in parallel threads.
_PARSE_LOCK = threading.Lock()

#: Seconds a file must have been unchanged when its cache entry was written for the
#: entry to be trusted (see the module docstring).
RACY_S = 2.0


class StatCache:
    """Digest and imports of each source file of one tree, kept in a JSON file and
    reused while the file's (size, mtime_ns, inode) match; plus the installed
    distributions, reused while the ``sys.path`` folders' mtimes match."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._dirty = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.files: dict[str, list[Any]] = dict(data.get("files", {}))
            self.dists: dict[str, Any] = dict(data.get("dists", {}))
        except (OSError, ValueError, AttributeError):
            self.files, self.dists = {}, {}

    @staticmethod
    def _stat_key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def get(self, path: Path, st: os.stat_result) -> list[Any] | None:
        """The stored ``[sha256, imports, external]`` of ``path``, if it is unchanged."""
        entry = self.files.get(str(path))
        if not entry or entry[0] != self._stat_key(st):
            return None
        if entry[1] - st.st_mtime_ns < RACY_S * 1e9:  # racily clean: re-read
            return None
        return entry[2]

    def put(self, path: Path, st: os.stat_result, value: list[Any]) -> None:
        with self._lock:
            self.files[str(path)] = [self._stat_key(st), time.time_ns(), value]
            self._dirty = True

    def save(self) -> None:
        """Write the entries (atomically) when any changed; a cache that cannot be written
        is only slower next time."""
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps({"files": self.files, "dists": self.dists})
            self._dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(data, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass

    def distributions(self) -> dict[str, Any]:
        """``{"providers": {top: [dist, ...]}, "versions": {dist: version}}`` of the
        installed distributions, rescanned when a ``sys.path`` folder changed."""
        stamp = []
        for entry in sys.path:
            if Path(entry).name not in ("site-packages", "dist-packages"):
                continue  # the script's folder, the working directory: no distributions
            try:
                stamp.append([entry, os.stat(entry or ".").st_mtime_ns])
            except OSError:
                continue
        with self._lock:
            if self.dists.get("stamp") == stamp:
                return self.dists
        providers = importlib.metadata.packages_distributions()
        versions: dict[str, str | None] = {}
        for dists in providers.values():
            for dist in dists:
                if dist not in versions:
                    try:
                        versions[dist] = importlib.metadata.version(dist)
                    except importlib.metadata.PackageNotFoundError:
                        versions[dist] = None
        with self._lock:
            self.dists = {"stamp": stamp, "providers": providers, "versions": versions}
            self._dirty = True
            return self.dists


_STAT_CACHES: dict[Path, StatCache] = {}
_STAT_CACHES_LOCK = threading.Lock()


def stat_cache(root: Path) -> StatCache:
    """This process's :class:`StatCache` of source tree ``root`` (one file per tree)."""
    from gpt.paths import cache_dir

    with _STAT_CACHES_LOCK:
        cache = _STAT_CACHES.get(root)
        if cache is None:
            name = hashlib.sha256(str(root).encode()).hexdigest()[:16]
            cache = StatCache(cache_dir() / "source-fingerprints" / f"{name}.json")
            _STAT_CACHES[root] = cache
        return cache


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` under ``root`` (a package's ``__init__.py``),
    or None when ``name`` is not a module there (e.g. a function imported by name)."""
    rel = Path(*name.split("."))
    for candidate in (root / rel / "__init__.py", root / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def _source_facts(name: str, root: Path) -> tuple[str, frozenset[str], frozenset[str]]:
    """The sha256 of module ``name``'s source, the project modules it imports directly
    (and the packages holding them, whose ``__init__`` runs first) and the third-party
    top-level names it imports (``sklearn`` for ``from sklearn.linear_model import …``):
    from the stat cache while the file is unchanged."""
    path = _module_file(name, root)
    if path is None:
        raise ValueError(f"module {name!r} has no source file under {root}")
    st = path.stat()
    cache = stat_cache(root)
    hit = cache.get(path, st)
    if hit is not None:
        return hit[0], frozenset(hit[1]), frozenset(hit[2])
    data = path.read_bytes()
    found, external = _imports(name, root, path, data)
    digest = hashlib.sha256(data).hexdigest()
    cache.put(path, st, [digest, sorted(found), sorted(external)])
    return digest, found, external


def _imports(
    name: str, root: Path, path: Path, data: bytes
) -> tuple[frozenset[str], frozenset[str]]:
    """The project modules and third-party top-level names that one version of a file
    (its bytes ``data``) imports."""
    source = data.decode("utf-8")
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    external: set[str] = set()

    def add(mod: str) -> None:
        if not _is_project(mod):
            top = mod.split(".", 1)[0]
            if top and top not in sys.stdlib_module_names:
                external.add(top)
            return
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # parent packages run their __init__ too
            prefix = ".".join(parts[:i])
            if _module_file(prefix, root) is not None:
                found.add(prefix)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(name, is_package, node.level, node.module)
                if node.level
                else node.module or ""
            )
            add(base)
            for alias in node.names:  # `from pkg import module`
                sub = f"{base}.{alias.name}"
                if _is_project(sub) and _module_file(sub, root) is not None:
                    add(sub)
    found.discard(name)
    return frozenset(found), frozenset(external)


def module_closure(name: str, root: Path = SOURCE_ROOT) -> list[str]:
    """``name`` and every project module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_source_facts(mod, root)[1] - seen)
    return sorted(seen)


@lru_cache(maxsize=64)
def _fingerprint(name: str, root: Path) -> str:
    h = hashlib.sha256()
    for mod in module_closure(name, root):
        h.update(mod.encode() + b"\0")
        h.update(bytes.fromhex(_source_facts(mod, root)[0]))
    stat_cache(root).save()
    return h.hexdigest()


def code_fingerprint(module: str, root: Path | None = None) -> str:
    """sha256 over the sources of ``module``'s closure (see :func:`module_closure`).
    Cached per process: the code a process runs does not change under it."""
    return _fingerprint(module, (root or SOURCE_ROOT).resolve())


def package_versions(module: str, root: Path | None = None) -> dict[str, str | None]:
    """Distribution -> version of every third-party package that the library modules
    (:data:`LIBRARY_PACKAGES`) of ``module``'s closure import, e.g. ``{"scikit-learn":
    "1.5.0", "torch": "2.4.1", ...}``. A module no installed distribution provides is
    listed under its own name with None (an optional import that is absent). Versions
    are release versions: a build variant (``+cpu``, ``+cu124``) is left out, as the
    device is."""
    root = (root or SOURCE_ROOT).resolve()
    tops: set[str] = set()
    for mod in module_closure(module, root):
        if mod.split(".", 1)[0] in LIBRARY_PACKAGES:
            tops |= _source_facts(mod, root)[2]
    providers = _distributions(root)["providers"]
    out: dict[str, str | None] = {}
    for top in sorted(tops):
        dists = providers.get(top)
        if not dists:
            out[top] = None
        for dist in dists or ():
            out[_canonical(dist)] = distribution_version(dist)
    stat_cache(root).save()
    return dict(sorted(out.items()))


@lru_cache(maxsize=4)
def _distributions(root: Path) -> dict[str, Any]:
    """The installed distributions (:meth:`StatCache.distributions`), once per process:
    what is installed does not change under a running process."""
    installed = stat_cache(root).distributions()
    _SCANNED_VERSIONS.update(installed["versions"])
    return installed


#: Versions read by the last scan of the installed distributions (:func:`_distributions`).
_SCANNED_VERSIONS: dict[str, str | None] = {}


def distribution_version(dist: str) -> str | None:
    """The release version of an installed distribution as the scan of the installed
    distributions saw it (:func:`_distributions`); None when it is not installed."""
    version = _SCANNED_VERSIONS.get(dist)
    return version.split("+", 1)[0] if version else None


def _canonical(dist: str) -> str:
    """A distribution's normalised name (PEP 503: ``tensorflow_cpu`` -> ``tensorflow-cpu``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()
