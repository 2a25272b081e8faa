"""``gptflow deploy``: the work pools and deployments of ``prefect.yaml``, as often as
you like (after every edit of the file)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="create the work pools prefect.yaml names (when missing), then deploy all",
        description=(
            "Create each work pool the deployments in prefect.yaml name (type process) "
            "unless it exists, then run `prefect --no-prompt deploy --all` in the checkout. "
            "The pipeline's deployments and the gptflow-stage/<pool> ones that run the "
            "stages a run's placement puts on a pool. "
            "Safe to run again: existing pools are kept, deployments are updated. Uses "
            "PREFECT_API_URL, else gptflow's local server (started if needed)."
        ),
    )
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployment import (
        check_parameters,
        deploy_all,
        ensure_work_pools,
        read_prefect_yaml,
        work_pools,
    )
    from flows.server import ensure_server
    from gpt.paths import project_root

    root = project_root()
    spec = read_prefect_yaml(root)
    check_parameters(spec)  # a bad setting is refused before anything is deployed
    api_url = ensure_server()
    pools = work_pools(spec)
    for name, created in ensure_work_pools(pools).items():
        print(f"work pool {name!r}: {'created' if created else 'exists'} (type process)")
    deploy_all(root)
    names = ", ".join(str(d.get("name")) for d in spec["deployments"])
    print(f"deployments {names} are on {api_url}, running code from {root}")
    print(
        "start a worker (own terminal, from the clone, venv active):\n"
        f"  export PREFECT_API_URL={api_url}\n"
        '  export GPTFLOW_HOME="$PWD"\n'
        f"  prefect worker start --pool {pools[0]}"
    )
    stage_pools = [p for p in pools if p != pools[0]]
    if stage_pools:
        print(
            f"stages placed on a pool ({', '.join(stage_pools)}; placement.<stage>=<pool>) "
            "run on a worker of that pool, started the same way on a machine that shares "
            "the artifacts folder, e.g.\n"
            f"  prefect worker start --pool {stage_pools[0]}"
        )
    return 0
