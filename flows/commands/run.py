"""``gptflow run``, ``rerun``, ``runs``, ``server`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

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
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("runs", help="list pipeline runs and their stages")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
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


def _print_result(result: dict) -> None:
    print(f"run {result['run_id']}: {result['status']}")
    for stage, info in result["stages"].items():
        msg = info.get("message")
        extra = f"  {msg}" if isinstance(msg, str) and msg else ""
        print(f"  {stage:<18} {info['status']:<10}{extra}")
    if result.get("error"):  # e.g. a failed regression gate after every stage completed
        print(f"  error: {result['error']}")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.server import ensure_server

    ensure_server()
    from flows.pipeline import run_pipeline

    result = run_pipeline(
        profile=args.profile, overrides=args.set, mirror=args.mirror, force=args.force
    )
    _print_result(result)
    return 0 if result["status"] == "completed" else 1


def cmd_rerun(args: argparse.Namespace) -> int:
    from flows.server import ensure_server
    from tasks.catalog import Catalog

    ensure_server()
    from flows.pipeline import run_pipeline

    if args.profile:
        result = run_pipeline(
            profile=args.profile, overrides=args.set, mirror=args.mirror, force=[args.stage]
        )
    else:
        cat = Catalog()
        if args.run:
            df = cat.query_df("SELECT config, profile FROM runs WHERE run_id = ?", [args.run])
            if df.empty:
                raise ConfigError(f"no run {args.run!r} in the catalog (see `gptflow runs`)")
        else:
            df = cat.query_df("SELECT config, profile FROM runs ORDER BY started_at DESC LIMIT 1")
            if df.empty:
                raise ConfigError("no earlier run in the catalog: use `gptflow run` first")
        config = df.iloc[0]["config"]
        config = json.loads(config) if isinstance(config, str) else config
        result = run_pipeline(
            profile=config.get("profile", DEFAULT_PROFILE),
            overrides=args.set,
            base_config=config,
            mirror=args.mirror,
            force=[args.stage],
        )
    _print_result(result)
    return 0 if result["status"] == "completed" else 1


def cmd_runs(args: argparse.Namespace) -> int:
    from tasks.catalog import Catalog
    from tasks.catalog.present import format_df

    cat = Catalog()
    df = cat.query_df(
        """
        SELECT r.run_id, r.profile, r.status, r.started_at, r.ended_at,
               string_agg(s.stage || ':' || s.status, ' ' ORDER BY s.started_at) AS stages
        FROM runs r LEFT JOIN stages s USING (run_id)
        GROUP BY ALL ORDER BY r.started_at DESC LIMIT ?
        """,
        [args.limit],
    )
    print(format_df(df, args.format))
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


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from flows import server
    from gpt.paths import artifacts_dir, datasets_dir, default_db_path

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
    from gpt.eval.judge import JudgeConfig, preflight

    jcfg = JudgeConfig()
    try:
        preflight(jcfg)
        _check(True, "ollama", f"{jcfg.host}, model {jcfg.model} present")
    except Exception as exc:  # the judge is optional unless judge.required
        _check(None, "ollama", str(exc))
    mirror = os.environ.get("GPTFLOW_MIRROR")
    if mirror:
        exists = mirror.startswith(("http://", "https://")) or Path(mirror).is_dir()
        good &= _check(exists, "mirror", mirror)
    else:
        _check(None, "mirror", "GPTFLOW_MIRROR unset: inputs come from the web")
    ds = datasets_dir()
    sizes = [p.name for p in sorted((ds / "gpt2").glob("*M")) if (p / "hparams.json").exists()]
    _check(
        True if sizes else None,
        "gpt-2 weights",
        f"present: {', '.join(sizes)}" if sizes else f"none under {ds / 'gpt2'} yet",
    )
    db = default_db_path()
    _check(True if db.exists() else None, "catalog", str(db) + ("" if db.exists() else " (new)"))
    return 0 if good else 1
