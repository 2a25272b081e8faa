"""Prefect deployments of gptflow: the pull step that puts a flow run in the checkout, and
an idempotent "create the work pools, then deploy everything" for ``gptflow deploy``.

Why a pull step of our own: ``prefect deploy`` templates ``{{ $GPTFLOW_HOME }}`` in
Prefect's ``set_working_directory`` from the *deploying* shell (Prefect 3.9.1), so a
worker without it gets ``""`` and the run crashes with ``ScriptError``. Ours runs in the
flow-run process, takes GPTFLOW_HOME from the *worker's* environment, else the checkout
holding this package, and refuses with the fix when that is no gptflow checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt.errors import GPTFlowError
from gpt.paths import project_root

#: The file holding the deployments, at the checkout's root.
PREFECT_YAML = "prefect.yaml"
#: A file every gptflow checkout has (the pipeline's entrypoint).
MARKER = Path("flows") / "pipeline.py"


class DeploymentError(GPTFlowError):
    """A deployment cannot be created or a flow run cannot find its code."""


def enter_checkout() -> dict[str, str]:
    """Prefect pull step (``flows.deployment.enter_checkout``): change into the gptflow
    checkout and return ``{"directory": path}`` like ``set_working_directory``."""
    root = project_root()
    source = "GPTFLOW_HOME" if os.environ.get("GPTFLOW_HOME") else "the checkout gptflow runs from"
    if not (root / MARKER).is_file():
        raise DeploymentError(
            f"{root} ({source}) is not a gptflow checkout: it has no {MARKER.as_posix()}. "
            "Start the worker with GPTFLOW_HOME set to the clone's absolute path "
            '(`export GPTFLOW_HOME="$PWD"` in the clone, then `prefect worker start --pool '
            "gptflow`), from the clone's virtual environment"
        )
    os.chdir(root)
    return {"directory": str(root)}


def read_prefect_yaml(root: Path | None = None) -> dict[str, Any]:
    """The deployments file of the checkout, parsed."""
    import yaml

    path = (root or project_root()) / PREFECT_YAML
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeploymentError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list):
        raise DeploymentError(f"{path} has no `deployments:` list")
    return spec


def work_pools(spec: dict[str, Any]) -> list[str]:
    """The work pools the deployments of ``spec`` name, in file order."""
    names: list[str] = []
    for dep in spec["deployments"]:
        pool = (dep.get("work_pool") or {}).get("name")
        if not pool:
            raise DeploymentError(
                f"deployment {dep.get('name')!r} in {PREFECT_YAML} names no work_pool.name"
            )
        if pool not in names:
            names.append(pool)
    return names


def check_parameters(spec: dict[str, Any]) -> int:
    """Build the config each deployment's parameters describe (``profile``,
    ``overrides``, ``config``), so that a bad value in ``prefect.yaml`` is refused by
    ``gptflow deploy``, naming the deployment and the field, rather than by the scheduled
    run. Returns how many deployments were checked."""
    from flows.config import PipelineConfig, build_config
    from flows.profiles import DEFAULT_PROFILE
    from gpt.errors import ConfigError

    checked = 0
    for dep in spec["deployments"]:
        params = dep.get("parameters") or {}
        if not {"profile", "overrides", "config"} & set(params):
            continue
        try:
            if params.get("config") is not None:
                PipelineConfig.model_validate(params["config"])
            else:
                build_config(params.get("profile", DEFAULT_PROFILE), params.get("overrides"))
        except ConfigError as exc:
            raise DeploymentError(
                f"deployment {dep.get('name')!r} in {PREFECT_YAML}: {exc}"
            ) from None
        checked += 1
    return checked


def _job_template(pool_type: str) -> dict[str, Any]:
    """The default job template of a worker type, as ``prefect work-pool create`` uses."""
    from prefect.workers.base import BaseWorker

    worker = BaseWorker.get_worker_class_from_type(pool_type)
    if worker is None:
        raise DeploymentError(f"no Prefect worker of type {pool_type!r} is installed")
    return worker.get_default_base_job_template()


def ensure_work_pools(names: list[str], pool_type: str = "process") -> dict[str, bool]:
    """Create each missing work pool (type ``pool_type``); leave existing ones as they are.
    Returns ``{name: created}``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    created: dict[str, bool] = {}
    template = _job_template(pool_type)
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
                )
                created[name] = True
            except ObjectAlreadyExists:  # kept as it is
                created[name] = False
    return created


def deploy_all(root: Path | None = None) -> str:
    """``prefect --no-prompt deploy --all`` in the checkout; returns its output."""
    root = root or project_root()
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_CLI_PROMPT": "false"},
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise DeploymentError(f"`prefect deploy --all` in {root} failed:\n{tail}")
    return proc.stdout
