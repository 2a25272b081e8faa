"""Loading the DuckDB extensions a DuckLake catalog needs (ducklake, postgres_scanner,
httpfs, sqlite_scanner).

Offline machines get them from the ``duckdb-extension-<name>`` packages (the ``lake``
extra, DuckDB 1.5.5 only). Per extension: an installed package is loaded straight from
its file (through a correctly named symlink under ``~/.cache/gptflow/duckdb-extensions/``
where the file name differs from the extension's; never copied into DuckDB's directory,
which races when processes start at once); else ``INSTALL`` and ``LOAD`` from DuckDB's
repository; else a :class:`~gpt.errors.CatalogError` naming the package to install.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from gpt.errors import CatalogError
from tasks.catalog.values import sql_str

if TYPE_CHECKING:
    import duckdb

#: DuckDB extension name → the registry package that ships it (``-postgres`` ships the
#: file ``postgres.duckdb_extension``, which registers itself as ``postgres_scanner``).
PACKAGES: dict[str, str] = {
    "ducklake": "duckdb-extension-ducklake",
    "postgres_scanner": "duckdb-extension-postgres",
    "httpfs": "duckdb-extension-httpfs",
    "sqlite_scanner": "duckdb-extension-sqlite",
}


def packaged_file(name: str, version: str) -> Path | None:
    """The extension file inside its registry package for DuckDB ``version`` (e.g.
    ``v1.5.5``), or None when the package (or that version's file) is not installed."""
    package = PACKAGES.get(name)
    if package is None:
        return None
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    folder = root / "extensions" / version
    files = sorted(folder.glob("*.duckdb_extension")) if folder.is_dir() else []
    return files[0] if files else None


def loadable_path(file: Path, name: str, version: str) -> Path:
    """``file`` itself when its name is ``<name>.duckdb_extension``, else a symbolic link
    of that name to it (created atomically, so concurrent processes never see half of
    one)."""
    if file.name == f"{name}.duckdb_extension":
        return file
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(cache) / "gptflow" / "duckdb-extensions" / version
    link = folder / f"{name}.duckdb_extension"
    if link.is_symlink() and link.resolve() == file.resolve():
        return link
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    tmp.symlink_to(file)
    os.replace(tmp, link)
    return link


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> str:
    """Make extension ``name`` available on ``con``; returns where it came from
    (``loaded``, ``package``, ``repository``)."""
    import duckdb

    row = con.execute(
        "SELECT installed, loaded FROM duckdb_extensions() WHERE extension_name = ?", [name]
    ).fetchone()
    installed, loaded = (bool(row[0]), bool(row[1])) if row else (False, False)
    if loaded:
        return "loaded"
    version = con.execute("PRAGMA version").fetchone()[0]
    package = PACKAGES.get(name, f"duckdb-extension-{name}")
    file = packaged_file(name, version)
    if file is not None:
        try:
            path = loadable_path(file, name, version).as_posix()
            con.execute(f"LOAD {sql_str(path)}")
            return "package"
        except (duckdb.Error, OSError) as exc:
            raise CatalogError(
                f"the DuckDB extension {name!r} from the package {package} ({file}) does not "
                f"load into DuckDB {version}: {exc}. Install the package matching the DuckDB "
                f"version: pip install '{package}=={version.lstrip('v')}'"
            ) from exc
    try:
        if not installed:
            con.execute(f"INSTALL {name}")
        con.execute(f"LOAD {name}")
        return "repository"
    except duckdb.Error as exc:
        raise CatalogError(
            f"the DuckDB extension {name!r} is needed for a DuckLake catalog but is not "
            f"installed and could not be downloaded ({exc}). Install it from the package "
            f"registry: pip install 'gptflow[lake]' (or pip install "
            f"'{package}=={version.lstrip('v')}')"
        ) from exc
