"""Where gptflow keeps its data. Every location can be overridden by an environment
variable so tests and deployments can point elsewhere.

The artifacts root (``GPTFLOW_ARTIFACTS``) may be a local folder, a ``file://`` URL or an
object-store URL such as ``s3://bucket/prefix`` (:func:`artifacts_root`). A remote root
has a local side under the cache folder (:func:`cache_dir`): the work folders and
verified copies of its stage folders, and the files that are always local (logs, the
default catalog file, the Prefect home), which :func:`artifacts_dir` returns.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def project_root() -> Path:
    """``GPTFLOW_HOME`` if set, else the source checkout holding this package (an
    editable install), else the current directory."""
    env = os.environ.get("GPTFLOW_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd().resolve()


def datasets_dir() -> Path:
    """Downloaded inputs (``GPTFLOW_DATASETS`` overrides)."""
    env = os.environ.get("GPTFLOW_DATASETS")
    return Path(env).expanduser().resolve() if env else project_root() / "datasets"


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")


def url_protocol(location: str) -> str | None:
    """The protocol of an URL (``s3``, ``file``, …), or None for a plain path (a Windows
    drive letter is not a protocol)."""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else None


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for an URL other than ``file://`` (an object store, reached through fsspec)."""
    return url_protocol(str(location)) not in (None, "file", "local")


def local_path(location: str | os.PathLike[str]) -> Path:
    """A plain path or ``file://`` URL as an absolute local path."""
    text = str(location)
    if url_protocol(text) in ("file", "local"):
        text = text.split("://", 1)[1]
    return Path(text).expanduser().resolve()


def cache_dir() -> Path:
    """Local cache of remote artifacts (``GPTFLOW_CACHE``, else ``$XDG_CACHE_HOME/gptflow``
    or ``~/.cache/gptflow``)."""
    env = os.environ.get("GPTFLOW_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "gptflow"


def remote_cache_dir(url: str) -> Path:
    """The local side of the remote root ``url``: a folder of :func:`cache_dir` named
    after it (readable, and unique through a short hash)."""
    url = url.rstrip("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-")[:80]
    return cache_dir() / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def artifacts_root() -> str:
    """The artifacts root as given: an object-store URL (``s3://bucket/prefix``, without
    a trailing slash) or an absolute local path (``GPTFLOW_ARTIFACTS``, else
    ``artifacts/`` of the project)."""
    env = os.environ.get("GPTFLOW_ARTIFACTS")
    if not env:
        return str(project_root() / "artifacts")
    if is_remote(env):
        return env.rstrip("/")
    return str(local_path(env))


def artifacts_dir() -> Path:
    """The local artifacts folder: checkpoints, plots, exports, logs, the catalog
    (``GPTFLOW_ARTIFACTS`` overrides). For an object-store root, its local side under
    the cache (:func:`remote_cache_dir`)."""
    root = artifacts_root()
    return remote_cache_dir(root) if is_remote(root) else Path(root)


def default_db_path() -> Path:
    """The DuckDB catalog (``GPTFLOW_DB`` overrides)."""
    env = os.environ.get("GPTFLOW_DB")
    return Path(env).expanduser().resolve() if env else artifacts_dir() / "gptflow.duckdb"
