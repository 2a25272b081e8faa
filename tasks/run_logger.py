"""The logger of the Prefect run a call happens in (its lines show in the UI)."""

from __future__ import annotations

import logging


def run_logger(fallback: str = "gptflow") -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else the logger ``fallback``
    (a stage body or a gate called directly, e.g. in tests)."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run
        return logging.getLogger(fallback)
