"""Where gptflow keeps its data. Every location can be overridden by an environment
variable so tests and deployments can point elsewhere."""

from __future__ import annotations

import os
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


def artifacts_dir() -> Path:
    """Checkpoints, plots, exports, the catalog (``GPTFLOW_ARTIFACTS`` overrides)."""
    env = os.environ.get("GPTFLOW_ARTIFACTS")
    return Path(env).expanduser().resolve() if env else project_root() / "artifacts"


def default_db_path() -> Path:
    """The DuckDB catalog (``GPTFLOW_DB`` overrides)."""
    env = os.environ.get("GPTFLOW_DB")
    return Path(env).expanduser().resolve() if env else artifacts_dir() / "gptflow.duckdb"
