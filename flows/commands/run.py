"""``gptflow run`` and ``gptflow rerun``: start a pipeline run (the Prefect server
started when needed), print its stages, and keep tracebacks in a log file."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flows.commands import add_retrust_arg
from flows.profiles import DEFAULT_PROFILE, available_profiles
from tasks.stages import STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole pipeline (the main job)")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=available_profiles(),
        help=f"named settings (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        choices=STAGES,
        help="recompute this stage even if cached (repeatable)",
    )
    _run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "rerun",
        help="recompute one stage; downstream stages recompute only if its outputs changed",
    )
    p.add_argument("stage", choices=STAGES)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--run",
        help="take the config of this earlier run: its id or a unique prefix "
        "(default: the latest run)",
    )
    src.add_argument("--profile", choices=available_profiles())
    _run_args(p)
    p.set_defaults(func=cmd_rerun)


def _run_args(p: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``rerun`` share."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="override one config field, e.g. --set pretrain.epochs=2 (repeatable)",
    )
    p.add_argument("--mirror", help="local folder or http(s) URL mirroring the inputs")
    p.add_argument(
        "--verify",
        choices=["auto", "full"],
        default="auto",
        help="how cached results are checked before reuse: auto (sizes, hashes of small "
        "files and of files changed since written) or full (hash every file)",
    )
    add_retrust_arg(p)


def cmd_run(args: argparse.Namespace) -> int:
    return _start(args, args.profile, force=args.force)


def cmd_rerun(args: argparse.Namespace) -> int:
    if args.profile:
        return _start(args, args.profile, force=[args.stage])
    config = _stored_config(args.run)  # found before any server starts
    return _start(args, config.get("profile", DEFAULT_PROFILE), base=config, force=[args.stage])


def _stored_config(ref: str | None) -> dict[str, Any]:
    """The config run ``ref`` (default: the latest run) recorded."""
    from flows.commands import run_or_latest, stored_config
    from gpt.errors import ConfigError
    from tasks.catalog import Catalog

    cat = Catalog()
    run_id = run_or_latest(cat, ref)
    config = stored_config(cat, run_id)
    if not config:
        raise ConfigError(f"run {run_id} has no config in {cat.location} to rerun")
    return config


def _start(
    args: argparse.Namespace,
    profile: str,
    *,
    force: list[str],
    base: dict[str, Any] | None = None,
) -> int:
    """Run the pipeline with the settings of ``args`` and print its result."""
    from flows.config import build_config
    from flows.server import ensure_server

    build_config(profile, args.set, base=base)  # a bad setting: one line, before any server
    ensure_server()
    from flows.pipeline import run_pipeline

    log_file = quiet_console(verbose=getattr(args, "verbose", False))
    result = run_pipeline(
        profile=profile,
        overrides=args.set,
        base_config=base,
        mirror=args.mirror,
        force=force,
        verify=args.verify,
        retrust=args.retrust,
    )
    return _print_result(result, args.command, log_file)


def _print_result(result: dict, command: str, log_file: Path | None) -> int:
    """The run's stages, then — for a failed run — one ``gptflow CMD: error:`` line
    naming the stage and what it said. Returns the exit code."""
    print(f"run {result['run_id']}: {result['status']}")
    for stage, info in result["stages"].items():
        msg = info.get("message")
        extra = f"  {msg}" if isinstance(msg, str) and msg and info["status"] != "failed" else ""
        print(f"  {stage:<18} {info['status']:<10}{extra}")
    if result["status"] == "completed":
        return 0
    failed = [(s, i) for s, i in result["stages"].items() if i["status"] == "failed"]
    if failed:
        stage, info = failed[0]
        what = f"stage {stage} failed: {info.get('message') or 'no message recorded'}"
    else:
        what = f"the run failed: {result.get('error') or 'no message recorded'}"
    where = f" (full log: {log_file})" if log_file is not None else ""
    print(f"gptflow {command}: error: {' '.join(what.split())}{where}", file=sys.stderr)
    return 1


class _NoTraceback(logging.Formatter):
    """Formats like ``inner`` but without exception tracebacks (they go to the log file)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        copy = logging.makeLogRecord(record.__dict__)
        copy.exc_info = copy.exc_text = copy.stack_info = None
        return self.inner.format(copy)


class _NoEngineErrors(logging.Filter):
    """Drops Prefect's own failure reports (the final ``error:`` line says it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect."):
            return True
        if record.levelno >= logging.ERROR:
            return False
        return not str(record.msg).startswith("Finished in state Failed")


def quiet_console(*, verbose: bool) -> Path | None:
    """Send everything (tracebacks included) to a log file under ``artifacts/logs/``;
    keep tracebacks off the terminal unless ``verbose``. Returns the log file."""
    import time

    import prefect  # noqa: F401  (Prefect configures its loggers on import)

    from gpt.paths import artifacts_dir

    folder = artifacts_dir() / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    log_file = folder / f"gptflow-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    fh = logging.FileHandler(log_file, encoding="utf-8")
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        if lg is logging.getLogger() or (lg.handlers and not lg.propagate):
            lg.addHandler(fh)
        if verbose:
            continue
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setFormatter(_NoTraceback(h.formatter))
                h.addFilter(_NoEngineErrors())
    return log_file
