"""The library's own log lines (per-epoch losses and accuracies, downloads, checkpoints)
in the flow run's logs, wherever the flow runs.

Prefect sends a logger's records to its API only when that logger has Prefect's API
handler, and Python drops a record before any handler sees it when the logger's effective
level is above the record's. ``PREFECT_LOGGING_EXTRA_LOGGERS`` attaches the handler but
leaves the level alone: under ``gptflow run`` the CLI has set the root logger to INFO, so
the lines arrive; in the process a Prefect worker starts for a deployment run, Prefect's
logging config leaves the root logger at WARNING, so every INFO line of ``gpt.*`` and
``tasks.*`` was dropped. :func:`route_library_logs`, called when a flow starts, fixes both
for every deployment, whatever its ``job_variables``.
"""

from __future__ import annotations

import logging

#: Top-level packages of this project whose loggers belong in the flow run's logs.
LIBRARY_LOGGERS = ("gpt", "tasks", "flows")


def _run_log_handler_class() -> type[logging.Handler]:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API handler that quietly skips records made outside a flow or task
        run (e.g. a CLI command calling the library after the flow ended) instead of
        warning about each."""

        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) is None and not (
                FlowRunContext.get() or TaskRunContext.get()
            ):
                return
            super().emit(record)

    return RunLogHandler


def route_library_logs(level: int = logging.INFO) -> list[str]:
    """Make the project's loggers send records of ``level`` and above to the current
    flow run's logs (idempotent). A logger whose effective level is stricter than
    ``level`` is set to ``level``; one without a Prefect API handler gets one. Returns
    the names of the loggers it changed."""
    from prefect.logging.handlers import APILogHandler

    changed: list[str] = []
    handler_cls = None
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        touched = False
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
            touched = True
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler_cls = handler_cls or _run_log_handler_class()
            logger.addHandler(handler_cls())
            touched = True
        if touched:
            changed.append(name)
    return changed


__all__ = ["LIBRARY_LOGGERS", "route_library_logs"]
