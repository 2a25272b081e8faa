"""The library's own log lines (per-epoch losses and accuracies, downloads, checkpoints)
in the flow run's logs, wherever the flow runs.

Prefect sends a logger's records to its API only when that logger has Prefect's API
handler, and Python drops a record before any handler sees it when the logger's effective
level is above the record's. ``PREFECT_LOGGING_EXTRA_LOGGERS`` attaches the handler but
leaves the level alone: under ``gptflow run`` the CLI sets the root logger to INFO, so the lines
arrive; in the process a Prefect worker starts for a deployment run, Prefect's logging
config leaves the root logger at WARNING, which would drop every INFO line of ``gpt.*``
and ``tasks.*``. :func:`route_library_logs`, called when a flow starts, sets both up for
every deployment, whatever its ``job_variables``.

It also keeps a user error (a :class:`~gpt.errors.GPTFlowError`: a bad override, a missing
input, a damaged checkpoint) to one ERROR line in the run's logs: Prefect reports an
exception with its traceback — once by the task engine, again by the flow engine, plus an
ERROR "Finished in state Failed" for the task. What reaches the API instead is the error's
own one-line message (which names the thing and the fix) at ERROR, once per flow run; the
traceback and the engines' repeats at DEBUG; a repeat without a traceback at INFO. Other
exceptions (bugs) keep their tracebacks at ERROR.
"""

from __future__ import annotations

import logging
import re
import traceback
from typing import Any

from gpt.errors import GPTFlowError, one_line

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


#: Loggers whose API handlers report the engines' exceptions.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

#: (flow run, error line) of the user errors already reported at ERROR in this process.
_REPORTED: set[tuple[str, str]] = set()


#: How Prefect names a run's exception in a failed state's message (a task whose retry
#: condition refused a retry reports it only this way).
_STATE_EXCEPTION = re.compile(r"encountered an exception:? ([A-Za-z_]\w*): (.+?)['\"]?\)?$", re.S)


def _user_error_names() -> set[str]:
    """Names of :class:`GPTFlowError` and every subclass defined so far."""
    names, todo = set(), [GPTFlowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def _copy(record: logging.LogRecord, level: int, msg: str) -> logging.LogRecord:
    new = logging.makeLogRecord(record.__dict__)
    new.levelno, new.levelname = level, logging.getLevelName(level)
    new.msg, new.args, new.exc_info, new.exc_text, new.stack_info = msg, (), None, None, None
    return new


def user_error_records(record: logging.LogRecord) -> list[logging.LogRecord]:
    """What an API handler sends for ``record`` (module docstring): itself, or for an
    engine's report of a user error one ERROR line (the first time in its flow run) and
    the traceback at DEBUG."""
    exc = record.exc_info[1] if record.exc_info else None
    run = str(getattr(record, "flow_run_id", None))
    if isinstance(exc, GPTFlowError):
        line = one_line(f"{type(exc).__name__}: {exc}")
        text = "".join(traceback.format_exception(exc)).rstrip()
        debug = _copy(record, logging.DEBUG, f"{record.getMessage()}\n{text}")
        if (run, line) in _REPORTED:
            return [debug]
        _REPORTED.add((run, line))
        return [_copy(record, logging.ERROR, line), debug]
    if record.levelno >= logging.ERROR and record.exc_info is None:
        said = one_line(record.getMessage())
        for seen_run, line in _REPORTED:
            if seen_run == run and line.split(": ", 1)[-1][:80] in said:
                return [_copy(record, logging.INFO, record.getMessage())]
        found = _STATE_EXCEPTION.search(said)
        if found and found.group(1) in _user_error_names():
            line = f"{found.group(1)}: {found.group(2)}"
            _REPORTED.add((run, line))
            return [_copy(record, logging.ERROR, line), _copy(record, logging.DEBUG, said)]
    return [record]


def _one_line_user_errors(handler: logging.Handler) -> None:
    """Make ``handler`` send :func:`user_error_records` of each record (idempotent)."""
    if getattr(handler, "_gptflow_user_errors", False):
        return
    inner = handler.handle

    def handle(record: logging.LogRecord) -> Any:
        for r in user_error_records(record):
            inner(r)
        return True

    handler.handle = handle  # type: ignore[method-assign]
    handler._gptflow_user_errors = True  # type: ignore[attr-defined]


def route_library_logs(level: int = logging.INFO) -> list[str]:
    """Make the project's loggers send records of ``level`` and above to the current
    flow run's logs (idempotent). A logger whose effective level is stricter than
    ``level`` is set to ``level``; one without a Prefect API handler gets one. The
    engines' API handlers report user errors in one line (module docstring). Returns
    the names of the project's loggers it changed."""
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
    for name in ENGINE_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, APILogHandler):
                _one_line_user_errors(h)
    return changed


__all__ = ["LIBRARY_LOGGERS", "route_library_logs", "user_error_records"]
