"""``gptflow run``, ``rerun``, ``runs``, ``server`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from flows.commands import add_db_arg
from flows.profiles import DEFAULT_PROFILE, STAGES, available_profiles
from gpt.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole pipeline (the main job)")
    _common_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "rerun",
        help="recompute one stage; downstream stages recompute only if its outputs changed",
    )
    p.add_argument("stage", choices=STAGES)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="take the config of this earlier run (default: the latest)")
    src.add_argument("--profile", choices=available_profiles())
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    p.add_argument("--mirror", help="local folder or http(s) URL mirroring the inputs")
    _verify_arg(p)
    _retrust_arg(p)
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser(
        "runs",
        help="list pipeline runs and their stages (or one run's stages, one per line)",
    )
    p.add_argument("run", nargs="?", help="show this run's stages, one line each")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    add_db_arg(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("server", help="manage the local Prefect server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("doctor", help="check the environment and say what to fix")
    p.set_defaults(func=cmd_doctor)


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=available_profiles(),
        help=f"named settings (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="override one config field, e.g. --set pretrain.epochs=2 (repeatable)",
    )
    p.add_argument("--mirror", help="local folder or http(s) URL mirroring the inputs")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        choices=STAGES,
        help="recompute this stage even if cached (repeatable)",
    )
    _verify_arg(p)
    _retrust_arg(p)


def _retrust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retrust",
        action="append",
        default=[],
        metavar="NAME",
        help="accept a changed download of the files of this source (or file) that have no "
        "published sha256: fetch them again and record the new digest (repeatable)",
    )


def _verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        choices=["auto", "full"],
        default="auto",
        help="how cached results are checked before reuse: auto (sizes, hashes of small "
        "files and of files changed since written) or full (hash every file)",
    )


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


def cmd_run(args: argparse.Namespace) -> int:
    from flows.config import build_config
    from flows.server import ensure_server

    build_config(args.profile, args.set)  # a bad setting: one line, before any server starts
    ensure_server()
    from flows.pipeline import run_pipeline

    log_file = quiet_console(verbose=getattr(args, "verbose", False))
    result = run_pipeline(
        profile=args.profile,
        overrides=args.set,
        mirror=args.mirror,
        force=args.force,
        verify=args.verify,
        retrust=args.retrust,
    )
    return _print_result(result, "run", log_file)


def cmd_rerun(args: argparse.Namespace) -> int:
    from flows.config import build_config
    from flows.server import ensure_server
    from tasks.catalog import Catalog
    from tasks.catalog.lookup import resolve_run

    config = None
    if not args.profile:  # the earlier run's config, found before any server starts
        cat = Catalog()
        if args.run:
            run_id = resolve_run(cat, args.run)
            df = cat.query_df("SELECT config, profile FROM runs WHERE run_id = ?", [run_id])
            if df.empty:
                raise ConfigError(f"run {run_id} has no config in {cat.location} to rerun")
        else:
            df = cat.query_df("SELECT config, profile FROM runs ORDER BY started_at DESC LIMIT 1")
            if df.empty:
                raise ConfigError("no earlier run in the catalog: use `gptflow run` first")
        config = df.iloc[0]["config"]
        config = json.loads(config) if isinstance(config, str) else config
        build_config(config.get("profile", DEFAULT_PROFILE), args.set, base=config)
    else:
        build_config(args.profile, args.set)
    ensure_server()
    from flows.pipeline import run_pipeline

    log_file = quiet_console(verbose=getattr(args, "verbose", False))
    if config is None:
        result = run_pipeline(
            profile=args.profile,
            overrides=args.set,
            mirror=args.mirror,
            force=[args.stage],
            verify=args.verify,
            retrust=args.retrust,
        )
    else:
        result = run_pipeline(
            profile=config.get("profile", DEFAULT_PROFILE),
            overrides=args.set,
            base_config=config,
            mirror=args.mirror,
            force=[args.stage],
            verify=args.verify,
            retrust=args.retrust,
        )
    return _print_result(result, "rerun", log_file)


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


def cmd_runs(args: argparse.Namespace) -> int:
    """Runs with a stage summary that names every stage not completed/cached, and the
    reasons (whole) under the table; with RUN, that run's stages one per line."""
    from flows.report import fmt
    from tasks.catalog import Catalog
    from tasks.catalog.lookup import resolve_run
    from tasks.catalog.present import format_df
    from tasks.catalog.status import stage_rows, stages_summary
    from tasks.run_state import settle_runs

    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    cat = Catalog(args.db, snapshot=True)
    if args.run:
        run_id = resolve_run(cat, args.run)  # the id or a unique prefix
        runs = cat.query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if runs.empty:
            raise ConfigError(
                f"run {run_id} has no `runs` row in the catalog {cat.location} (it only "
                "holds judge scores: see `gptflow evals --run`)"
            )
    else:
        runs = cat.query_df("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", [args.limit])
    runs = settle_runs(runs)  # a "running" run whose process is gone shows as crashed
    stages = stage_rows(cat, [str(r) for r in runs["run_id"]], STAGES)
    if args.format == "json":
        out = []
        for r in runs.to_dict("records"):
            mine = stages[stages["run_id"] == r["run_id"]]
            row = json.loads(
                format_df(runs[runs["run_id"] == r["run_id"]].drop(columns="config"), "json")
            )[0]
            row["stages"] = json.loads(
                format_df(mine[["stage", "status", "cache_hit", "message"]], "json")
            )
            out.append(row)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if args.run:
        view = stages.assign(
            cached=stages["cache_hit"].map(fmt.yes_no),
            time=stages["seconds"].map(fmt.duration),
            message=stages["message"].map(lambda m: m if isinstance(m, str) else ""),
        )[["stage", "status", "cached", "time", "message"]]
        print(format_df(view, args.format, uncut={"message"}))
        if args.format == "table":
            r = runs.iloc[0]
            reason = f": {r['message']}" if isinstance(r["message"], str) else ""
            print(f"run {r['run_id']} {r['status']}{reason}")
        return 0
    view = runs[["run_id", "profile", "status"]].copy()
    view["started"] = runs["started_at"].map(fmt.timestamp)
    view["took"] = [
        fmt.duration((e - s).total_seconds())
        if not (fmt.is_missing(s) or fmt.is_missing(e))
        else ""
        for s, e in zip(runs["started_at"], runs["ended_at"], strict=True)
    ]
    view["stages"] = [stages_summary(stages[stages["run_id"] == r]) for r in runs["run_id"]]
    print(format_df(view, args.format, uncut={"run_id", "stages"}))
    if args.format == "table":
        for r in runs[runs["message"].notna()].to_dict("records"):  # why it failed/crashed
            print(f"{r['run_id']}: run {r['status']}: {r['message']}")
        notes = stages[~stages["status"].isin(["completed", "cached"]) & stages["message"].notna()]
        for r in notes.to_dict("records"):
            print(f"{r['run_id']}: {r['stage']} {r['status']}: {r['message']}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import server

    if args.action == "start":
        url = server.ensure_server()
        print(f"Prefect server up at {url} (UI: {url.removesuffix('/api')})")
    elif args.action == "stop":
        print("stopped" if server.stop_server() else "no managed server was running")
    else:
        st = server.status()
        for k, v in st.items():
            print(f"{k:<14} {v}")
        return 0 if st["healthy"] else 1
    return 0


def _check(ok: bool | None, what: str, detail: str) -> bool:
    mark = {True: "ok  ", False: "FAIL", None: "warn"}[ok]
    print(f"[{mark}] {what:<22} {detail}")
    return ok is not False


def mirror_in_use() -> tuple[str | None, str, bool]:
    """``(mirror, where it comes from, whether a new run takes it by default)``, looked
    up in the order a run looks: ``GPTFLOW_MIRROR``, the default profile's
    ``download.mirror``, else the one the latest run recorded (a ``--mirror`` flag or a
    deployment's parameter leave no other trace)."""
    from flows.config import build_config
    from gpt.data.download import MIRROR_ENV
    from gpt.errors import GPTFlowError

    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV], MIRROR_ENV, True
    try:
        setting = build_config(DEFAULT_PROFILE, []).download.mirror
    except GPTFlowError:
        setting = None
    if setting:
        return setting, f"download.mirror of profile {DEFAULT_PROFILE}", True
    try:
        from tasks.catalog import Catalog

        cat = Catalog()
        latest = (
            cat.query_df("SELECT run_id, config FROM runs ORDER BY started_at DESC LIMIT 1")
            if cat.exists()
            else None
        )
    except GPTFlowError:
        latest = None
    if latest is None or latest.empty:
        return None, f"no {MIRROR_ENV}, no download.mirror setting, no run yet", True
    run_id, config = latest.iloc[0]["run_id"], latest.iloc[0]["config"]
    config = json.loads(config) if isinstance(config, str) else config or {}
    used = (config.get("download") or {}).get("mirror")
    if used:
        return used, f"used by the latest run {run_id}, given as --mirror or a parameter", False
    return None, f"the latest run {run_id} used none; {MIRROR_ENV} unset", True


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from flows import server
    from gpt.errors import GPTFlowError
    from gpt.paths import artifacts_dir, datasets_dir

    good = True
    good &= _check(sys.version_info >= (3, 11), "python", sys.version.split()[0])
    if torch.cuda.is_available():
        dev = f"cuda: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = "mps"
    else:
        dev = f"cpu ({torch.get_num_threads()} threads)"
    good &= _check(True, "torch", f"{torch.__version__}, device {dev}")
    art = artifacts_dir()
    art.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(art).free / 1e9
    good &= _check(free_gb > 2, "disk", f"{free_gb:.1f} GB free under {art}")
    st = server.status()
    _check(
        True if st["healthy"] else None,
        "prefect server",
        f"{st['api_url']} " + ("up" if st["healthy"] else "down (gptflow run starts it)"),
    )
    from gpt.eval.judge.hosts import preflight
    from gpt.eval.judge.settings import JudgeConfig

    jcfg = JudgeConfig()
    try:
        hosts = preflight(jcfg)
        _check(
            True,
            "ollama",
            "; ".join(
                f"{h.url}: {', '.join(h.models) or 'no judge model'}" if h.up else f"{h.url}: down"
                for h in hosts
            ),
        )
    except Exception as exc:  # the judge is optional unless judge.required
        _check(None, "ollama", str(exc))
    mirror, source, automatic = mirror_in_use()
    if mirror:
        exists = mirror.startswith(("http://", "https://")) or Path(mirror).is_dir()
        detail = f"{mirror} ({source})" + ("" if exists else ": not a folder (any more)")
        # a missing mirror that new runs take by default fails; one a past run was given, warns
        good &= _check(True if exists else (False if automatic else None), "mirror", detail)
    else:
        _check(True, "mirror", f"none ({source}): inputs come from their web URLs")
    ds = datasets_dir()
    sizes = [p.name for p in sorted((ds / "gpt2").glob("*M")) if (p / "hparams.json").exists()]
    _check(
        True if sizes else None,
        "gpt-2 weights",
        f"present: {', '.join(sizes)}" if sizes else f"none under {ds / 'gpt2'} yet",
    )
    from tasks.catalog.settings import CatalogSettings

    try:
        cat = CatalogSettings.from_env()
    except GPTFlowError as exc:
        good &= _check(False, "catalog", str(exc))
    else:
        there = cat.exists()
        _check(True if there else None, "catalog", cat.location() + ("" if there else " (new)"))
    return 0 if good else 1
