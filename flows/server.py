"""The local Prefect server gptflow runs against.

Prefect's ephemeral mode costs 15-30 s per process and can lose task-run records, so
gptflow always talks to a real server: the one ``PREFECT_API_URL`` names, or a local one
it starts detached (analytics off, database migrated once). Its home, port and listen
address take ``GPTFLOW_PREFECT_{HOME,PORT,HOST}``, else Prefect's own variables
(:func:`server_paths`, :func:`local_api_url`, :func:`bind_host`; docs/deployments.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from gpt.errors import GPTFlowError
from gpt.paths import artifacts_dir

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


class PrefectServerError(GPTFlowError):
    """The Prefect server could not be reached or started."""


@dataclass(frozen=True)
class ServerPaths:
    """Files of the locally managed server."""

    home: Path
    pidfile: Path
    logfile: Path
    migrated_marker: Path


def _setting(*names: str) -> str | None:
    """The first of the environment variables ``names`` that is set and not empty."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def server_paths() -> ServerPaths:
    """Where the managed server keeps its database, pid and log (module docstring)."""
    home = Path(_setting("GPTFLOW_PREFECT_HOME", "PREFECT_HOME") or artifacts_dir() / "prefect")
    return ServerPaths(
        home=home,
        pidfile=home / "server.pid",
        logfile=home / "server.log",
        migrated_marker=home / ".db-migrated",
    )


def bind_host() -> str:
    """The address the managed server listens on: loopback, or ``GPTFLOW_PREFECT_HOST`` /
    ``PREFECT_SERVER_API_HOST`` (e.g. ``0.0.0.0`` for a server that workers on other
    machines reach)."""
    return _setting("GPTFLOW_PREFECT_HOST", "PREFECT_SERVER_API_HOST") or DEFAULT_HOST


def local_api_url() -> str:
    """The API URL of the managed local server (``GPTFLOW_PREFECT_PORT`` or
    ``PREFECT_SERVER_API_PORT`` picks the port)."""
    raw = _setting("GPTFLOW_PREFECT_PORT", "PREFECT_SERVER_API_PORT") or str(DEFAULT_PORT)
    try:
        port = int(raw)
    except ValueError:
        raise PrefectServerError(
            f"the Prefect server port {raw!r} (GPTFLOW_PREFECT_PORT / PREFECT_SERVER_API_PORT) "
            "is not a number: give a port such as 4200"
        ) from None
    return f"http://{DEFAULT_HOST}:{port}/api"


def _prefect_env(api_url: str) -> dict[str, str]:
    """Prefect's settings for the managed server and the processes that talk to it."""
    return {
        "PREFECT_HOME": str(server_paths().home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
    }


def configure_env() -> str:
    """Set Prefect's environment for this process (keeping values the user set) and
    return the API URL in use. Must run before ``prefect`` is imported."""
    defaults = {
        **_prefect_env(local_api_url()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(artifacts_dir() / "prefect-results"),
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        # the library's own loggers reach the flow run's logs in the UI too
        "PREFECT_LOGGING_EXTRA_LOGGERS": "gpt,tasks",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return os.environ["PREFECT_API_URL"]


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers its health check at ``api_url``."""
    try:
        resp = httpx.get(api_url.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def _server_env(api_url: str) -> dict[str, str]:
    return {
        **os.environ,
        **_prefect_env(api_url),
        # the UI's own calls: without this, a server on another port than 4200 serves a UI
        # that asks port 4200 and shows "Oops. Something went wrong." (a user's own value
        # wins: a server reached from other machines needs its public address here)
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or api_url,
    }


def _prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _read_pid() -> int | None:
    pidfile = server_paths().pidfile
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def start_server(api_url: str, *, wait_s: float = 90.0) -> str:
    """Start the managed local server at ``api_url`` unless it is up; return the URL."""
    if is_healthy(api_url):
        return api_url
    if not api_url.startswith(f"http://{DEFAULT_HOST}:"):
        raise PrefectServerError(
            f"the Prefect API at {api_url} does not answer and is not a local server gptflow "
            "can start: start it, or unset PREFECT_API_URL to let gptflow run its own"
        )
    port = api_url.split(":")[2].split("/")[0]
    paths = server_paths()
    paths.home.mkdir(parents=True, exist_ok=True)
    env = _server_env(api_url)
    if not paths.migrated_marker.exists():
        log.info("migrating the Prefect database in %s (once)", paths.home)
        proc = subprocess.run(
            _prefect_cmd("server", "database", "upgrade", "-y"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise PrefectServerError(
                f"`prefect server database upgrade` failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        paths.migrated_marker.touch()
    log.info("starting a local Prefect server on %s (log: %s)", api_url, paths.logfile)
    with open(paths.logfile, "ab") as logf:
        proc = subprocess.Popen(
            _prefect_cmd("server", "start", "--host", bind_host(), "--port", port),
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    paths.pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = paths.logfile.read_text(errors="replace")[-2000:]
            raise PrefectServerError(
                f"the Prefect server exited with code {proc.returncode} on start; "
                f"log {paths.logfile}:\n{tail}"
            )
        if is_healthy(api_url):
            return api_url
        time.sleep(0.5)
    raise PrefectServerError(
        f"the Prefect server did not answer at {api_url} within {wait_s:.0f} s; see {paths.logfile}"
    )


def stop_server(timeout_s: float = 20.0) -> bool:
    """Stop the managed local server; False when none was running."""
    pid = _read_pid()
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # a server this process started is its child: reap it once it exits, or its zombie
        # answers os.kill(pid, 0) until the timeout (not our child: ChildProcessError)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        server_paths().pidfile.unlink()
    return True


def ensure_server() -> str:
    """Point this process at a healthy Prefect server, starting the local one if needed."""
    return start_server(configure_env())


def status() -> dict[str, object]:
    """A small report: URL, health, managed pid, home."""
    api_url = configure_env()
    paths = server_paths()
    return {
        "api_url": api_url,
        "healthy": is_healthy(api_url),
        "managed_pid": _read_pid(),
        "prefect_home": str(paths.home),
        "log": str(paths.logfile),
    }
