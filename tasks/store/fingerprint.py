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
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import threading
from functools import lru_cache
from pathlib import Path

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


def imported_modules(name: str, root: Path = SOURCE_ROOT) -> set[str]:
    """Project modules that module ``name`` imports directly (and the packages that
    contain them, whose ``__init__`` runs first)."""
    return set(_parsed(name, root)[0])


def third_party_imports(name: str, root: Path = SOURCE_ROOT) -> set[str]:
    """Top-level names of the non-project, non-standard-library modules that module
    ``name`` imports (``sklearn`` for ``from sklearn.linear_model import ...``)."""
    return set(_parsed(name, root)[1])


def _parsed(name: str, root: Path) -> tuple[frozenset[str], frozenset[str]]:
    path = _module_file(name, root)
    if path is None:
        raise ValueError(f"module {name!r} has no source file under {root}")
    st = path.stat()
    return _imports(name, root, path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _imports(
    name: str, root: Path, path: Path, size: int, mtime_ns: int
) -> tuple[frozenset[str], frozenset[str]]:
    """The project modules and third-party top-level names that one version of a file
    imports (cached by size and mtime)."""
    source = path.read_text(encoding="utf-8")
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
        todo.extend(imported_modules(mod, root) - seen)
    return sorted(seen)


@lru_cache(maxsize=64)
def _fingerprint(name: str, root: Path) -> str:
    h = hashlib.sha256()
    for mod in module_closure(name, root):
        path = _module_file(mod, root)
        assert path is not None
        h.update(mod.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
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
            tops |= third_party_imports(mod, root)
    providers = _distributions()
    out: dict[str, str | None] = {}
    for top in sorted(tops):
        dists = providers.get(top)
        if not dists:
            out[top] = None
        for dist in dists or ():
            out[_canonical(dist)] = distribution_version(dist)
    return dict(sorted(out.items()))


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (one scan per process;
    what is installed does not change under a running process)."""
    return importlib.metadata.packages_distributions()


def distribution_version(dist: str) -> str | None:
    """The release version of an installed distribution (None when it is not installed)."""
    return _installed_version(dist)


@lru_cache(maxsize=256)
def _installed_version(dist: str) -> str | None:
    """:func:`distribution_version`, once per process."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version.split("+", 1)[0]


def _canonical(dist: str) -> str:
    """A distribution's normalised name (PEP 503: ``tensorflow_cpu`` -> ``tensorflow-cpu``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def module_origin(module: str) -> Path:
    """Where the running interpreter imports ``module`` from (a sanity check that the
    hashed sources are the ones that run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"module {module!r} not found")
    return Path(spec.origin).resolve()
