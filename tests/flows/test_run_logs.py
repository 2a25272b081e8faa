"""Library log lines reach the flow run's logs when the root logger is at WARNING (as in
the process a Prefect worker starts), once each, and calls outside a run stay quiet.
(The real worker path is tests/flows/test_deploy_worker.py.)"""

from __future__ import annotations

import logging
import warnings

import pytest

pytestmark = pytest.mark.prefect


@pytest.fixture
def quiet_root():
    """Prefect's own logging config in a worker's flow-run process: root at WARNING,
    the project's loggers unset."""
    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in ("gpt", "tasks", "flows")}
    handlers = {n: list(logging.getLogger(n).handlers) for n in ("gpt", "tasks", "flows")}
    root.setLevel(logging.WARNING)
    for n in saved[1]:
        logging.getLogger(n).setLevel(logging.NOTSET)
    yield
    root.setLevel(saved[0])
    for n, level in saved[1].items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).handlers[:] = handlers[n]


def test_library_info_lines_reach_the_flow_run(prefect_server, quiet_root):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.run_logs import route_library_logs

    @flow
    def probe(route: bool) -> None:
        if route:
            route_library_logs()
            route_library_logs()  # idempotent: still one line per record
        logging.getLogger("gpt.train").info("epoch 1 step 1: train loss 9.9 (probe %s)", route)

    ids = {}
    for route in (False, True):
        ids[route] = probe(route, return_state=True).state_details.flow_run_id
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        got = {
            route: [
                entry.message
                for entry in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid]))
                )
                if entry.name == "gpt.train"
            ]
            for route, fid in ids.items()
        }
    assert got[False] == []  # what deployment runs used to get
    assert got[True] == ["epoch 1 step 1: train loss 9.9 (probe True)"]

    # outside any run: no warning about a missing flow run id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logging.getLogger("gpt.checkpoint").info("saved outside a run")
