"""The code part of a stage's cache key, derived from what the stage imports.

A stage's fingerprint hashes the source of its own module and of every project module it
imports, transitively — at module level or inside functions (lazy imports count), since
:mod:`ast` sees them all. Nothing is listed by hand, so the key cannot drift from the
code: editing any module a stage can run changes its key, while modules it never
imports (the run report, the command line) leave it alone.

Only the project's own packages are followed (third-party code is pinned by the
environment, not by the key).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from functools import lru_cache
from pathlib import Path

#: Top-level packages whose modules are followed and hashed.
PROJECT_PACKAGES = ("gpt", "tasks")

#: The checkout holding those packages.
SOURCE_ROOT = Path(__file__).resolve().parents[1]

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
    path = _module_file(name, root)
    if path is None:
        raise ValueError(f"module {name!r} has no source file under {root}")
    st = path.stat()
    return set(_imports(name, root, path, st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=4096)
def _imports(name: str, root: Path, path: Path, size: int, mtime_ns: int) -> frozenset[str]:
    """:func:`imported_modules` for one version of a file (cached by size and mtime)."""
    source = path.read_text(encoding="utf-8")
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(mod: str) -> None:
        if not _is_project(mod):
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
    return frozenset(found)


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


def module_origin(module: str) -> Path:
    """Where the running interpreter imports ``module`` from (a sanity check that the
    hashed sources are the ones that run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"module {module!r} not found")
    return Path(spec.origin).resolve()
