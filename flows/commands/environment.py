"""``gptflow server`` and ``gptflow doctor``: the environment gptflow runs in — the local
Prefect server, and a check of everything a run needs, saying what to fix."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from flows.profiles import DEFAULT_PROFILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="manage the local Prefect server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("doctor", help="check the environment and say what to fix")
    p.set_defaults(func=cmd_doctor)


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
    from gpt.data.transfer import MIRROR_ENV
    from gpt.errors import GPTFlowError

    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV], MIRROR_ENV, True
    try:
        setting = build_config(DEFAULT_PROFILE, []).download.mirror
    except GPTFlowError:
        setting = None
    if setting:
        return setting, f"download.mirror of profile {DEFAULT_PROFILE}", True
    from flows.commands import run_or_latest, stored_config
    from tasks.catalog import Catalog

    try:
        cat = Catalog()
        run_id = run_or_latest(cat, None) if cat.exists() else None  # the latest run
        config = stored_config(cat, run_id) if run_id else {}
    except GPTFlowError:  # a bad catalog setting, or no run yet
        run_id, config = None, {}
    if run_id is None:
        return None, f"no {MIRROR_ENV}, no download.mirror setting, no run yet", True
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
