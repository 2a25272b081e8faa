"""Whether a run is really running: its process, its heartbeat, and the process that
started it.

A run records its ``host`` and ``pid`` and beats every :data:`HEARTBEAT_EVERY` seconds;
:func:`dead_reason` tells a ``running`` run whose process is gone (or silent for
:data:`STALE_AFTER` seconds) and :func:`settle_run` shows it ``crashed``.
:class:`RunWatch` beats and watches the process that started the run (a Prefect worker,
a shell): when that dies, its output pipe breaks, so the watch relays output through a
pipe of its own (:class:`_Relay`) and :func:`check_alive` then stops the run with a
:class:`~gpt.errors.WorkerDiedError` saying what happened.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpt.errors import WorkerDiedError
from tasks.catalog.values import to_utc_naive, utcnow

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a running run.
HEARTBEAT_EVERY = 60.0
#: A ``running`` run without a heartbeat for this many seconds is shown ``crashed``.
STALE_AFTER = 600.0
#: Seconds between two checks that the process that started the run is still there.
PARENT_CHECK_EVERY = 1.0

#: Statuses a run ends in.
TERMINAL = ("completed", "failed", "crashed")


def this_host() -> str:
    """The name of this machine, as run records store it."""
    return socket.gethostname()


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc tells."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, started_before: dt.datetime | None = None) -> bool:
    """Process ``pid`` of this host exists (and, where /proc tells, started before
    ``started_before``, a naive UTC time: a PID reused by a later process is not it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if started_before is not None:
        began = process_started_at(pid)
        limit = started_before.replace(tzinfo=dt.UTC).timestamp()
        if began is not None and began > limit + 5:  # 5 s: clock ticks, rounding
            return False
    return True


def _as_naive_utc(value: Any) -> dt.datetime | None:
    """A recorded time (text or timestamp) as naive UTC; None when missing or unreadable."""
    try:
        return to_utc_naive(value)
    except (TypeError, ValueError):
        return None


def dead_reason(run: Mapping[str, Any], now: dt.datetime | None = None) -> str | None:
    """Why the ``running`` run ``run`` (a ``runs`` row or record) is not running any
    more, or None while it may be."""
    if run.get("status") != "running":
        return None
    now = now or utcnow()
    host, pid = run.get("host"), run.get("pid")
    started = _as_naive_utc(run.get("started_at"))
    here = isinstance(host, str) and host == this_host() and pid is not None and pid == pid
    if here:  # the process itself tells, whatever its heartbeat says
        if process_alive(int(pid), started):
            return None
        return (
            f"its process (PID {int(pid)} on {host}) is gone: it was killed or died "
            "without ending the run"
        )
    beat = _as_naive_utc(run.get("heartbeat_at")) or started
    if beat is not None and (now - beat).total_seconds() > STALE_AFTER:
        where = f" on {host}" if isinstance(host, str) else ""
        return (
            f"no heartbeat since {beat:%Y-%m-%d %H:%M:%S} UTC (for more than "
            f"{STALE_AFTER / 60:g} min): its process{where} stopped without ending the run"
        )
    return None


def settle_run(run: Mapping[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """``run`` as it stands: a ``running`` run whose process is gone becomes ``crashed``
    with the reason, ended at its last sign of life."""
    reason = dead_reason(run, now)
    if reason is None:
        return dict(run)
    last = run.get("heartbeat_at") or run.get("started_at")
    return {**run, "status": "crashed", "message": reason, "ended_at": last}


def settle_runs(runs: Any) -> Any:
    """A ``runs`` DataFrame with every dead ``running`` run shown ``crashed`` (see
    :func:`settle_run`); a ``message`` column is added when missing."""
    if "message" not in runs.columns:
        runs = runs.assign(message=None)
    if runs.empty or not (runs["status"] == "running").any():
        return runs
    now = utcnow()
    runs = runs.copy()
    for i, row in runs.iterrows():
        settled = settle_run(row.to_dict(), now)
        if settled["status"] != row["status"]:
            for col in ("status", "message", "ended_at"):
                runs.at[i, col] = settled[col]
    return runs


# ---------------------------------------------------------------------- the watch
def _describe_parent(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmd = ""
    if "prefect" in cmd and "worker" in cmd:
        return f"the Prefect worker process (PID {pid}) that started this flow run"
    return f"the process that started this run (PID {pid})"


class _Relay:
    """Stands between file descriptor ``fd`` (stdout or stderr) and the pipe it wrote
    to: the process writes into a pipe of its own, and a thread copies what comes out to
    the original pipe. When that pipe breaks (its reader died), the thread drops the
    output, so no write of this process — progress bars, log handlers (``rich`` even
    exits on a broken pipe), C libraries — ever meets a ``BrokenPipeError``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = os.dup(fd)
        #: The original pipe broke (nothing reads it any more).
        self.broken = False
        self._read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._thread = threading.Thread(target=self._copy, name=f"gptflow-relay-{fd}", daemon=True)
        self._thread.start()

    @staticmethod
    def wanted(fd: int) -> bool:
        """Only a pipe can break this way (a terminal or a file keeps its behaviour)."""
        try:
            return stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            return False

    def _copy(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self._read, 65536)
                except OSError:
                    return
                if not data:  # every writer is gone: the relay was undone
                    return
                while data and not self.broken:
                    try:
                        data = data[os.write(self.saved, data) :]
                    except OSError:
                        self.broken = True
        finally:  # the thread owns both ends once it runs (a child may outlive undo)
            for fd in (self._read, self.saved):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def undo(self, *, to_devnull: bool) -> None:
        """Point ``fd`` back at the original pipe (or at /dev/null, when nothing reads
        that any more); the copying thread ends once the processes that inherited the
        relay's pipe (if any) have ended too."""
        target = os.open(os.devnull, os.O_WRONLY) if to_devnull or self.broken else self.saved
        try:
            os.dup2(target, self.fd)
        finally:
            if target != self.saved:
                os.close(target)
        self._thread.join(timeout=2)


class RunWatch:
    """The heartbeat of one run, and the watch on the process that started it.

    ``beat`` is called every :data:`HEARTBEAT_EVERY` seconds (it records the heartbeat);
    the parent is checked every :data:`PARENT_CHECK_EVERY` seconds. While the watch
    runs, output to a pipe (a worker's) goes through a :class:`_Relay`."""

    def __init__(self, beat: Callable[[], None]) -> None:
        self._beat = beat
        self.parent = os.getppid()
        self.parent_desc = _describe_parent(self.parent)
        #: Why the run must stop (the parent died), once it must.
        self.died: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptflow-run-watch", daemon=True)
        self._relays: list[_Relay] = []

    def start(self) -> RunWatch:
        global _CURRENT
        _CURRENT = self
        _flush_std()
        self._relays = [_Relay(fd) for fd in (1, 2) if _Relay.wanted(fd)]
        self._thread.start()
        return self

    def stop(self) -> None:
        global _CURRENT
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        _flush_std()
        self.check_parent()
        for relay in self._relays:
            relay.undo(to_devnull=self.died is not None)
        self._relays = []
        if _CURRENT is self and self.died is None:  # a death stays known to the flow
            _CURRENT = None

    def check_parent(self) -> None:
        """Notice that the parent died (its PID is no longer our parent's)."""
        if self.died is None and os.getppid() != self.parent:
            self.died = (
                f"{self.parent_desc} died while the run went on (killed?), so nothing reads "
                "the run's output any more; the run stopped here. Start the worker again and "
                "run the deployment again: finished stages are cache hits and an "
                "interrupted training resumes from its last checkpoint"
            )
            log.error("%s", self.died)

    def _loop(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_EVERY
        while not self._stop.wait(PARENT_CHECK_EVERY):
            self.check_parent()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_EVERY
                try:
                    self._beat()
                except Exception as exc:  # the next beat tries again
                    log.warning("could not record the run's heartbeat: %s", exc)


_CURRENT: RunWatch | None = None


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def check_alive() -> None:
    """Raise :class:`WorkerDiedError` when the watched run must stop because the process
    that started it died (a no-op outside a watched run)."""
    died = worker_died_reason()
    if died is not None:
        raise WorkerDiedError(died)


def worker_died_reason() -> str | None:
    """Why the watched run must stop because the process that started it died, or None
    (also outside a watched run)."""
    watch = _CURRENT
    if watch is None:
        return None
    watch.check_parent()
    return watch.died
