"""A loopback HTTP server for download tests, with switchable faults.

Serves a folder on 127.0.0.1 only. Every URL has one leading *alias* segment that is
ignored when mapping to a file, so one folder can pose as several hosts:
``/primary/the-verdict.txt`` and ``/backup/the-verdict.txt`` both serve
``<root>/the-verdict.txt`` but may carry different faults (keyed by the full URL path).
Every request is logged (path, Range header, status, bytes sent). All waits are bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

#: Longest a handler ever sleeps (a "slow" fault), whatever a test asks.
MAX_DELAY_S = 5.0


@dataclass
class Fault:
    """What goes wrong for requests to one URL path."""

    status: int | None = None
    """Answer with this HTTP status and a short body (e.g. 404, 500)."""
    body: bytes | None = None
    """Serve these bytes instead of the file (wrong content)."""
    delay: float = 0.0
    """Seconds to wait before answering (capped at MAX_DELAY_S): provokes client timeouts."""
    cut_after: int | None = None
    """Send the full Content-Length header but only this many body bytes, then close."""
    times: int | None = None
    """Apply to this many requests, then serve normally (None: always)."""
    throttle: float = 0.0
    """Seconds to pause after each 4 KiB of the body: a slow mirror (the pauses of one
    answer add up to MAX_DELAY_S at most)."""


@dataclass
class Request:
    """One logged request."""

    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class LoopbackServer:
    """State shared with the handler threads."""

    root: Path
    range_support: bool = True
    faults: dict[str, Fault] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (``"/alias/file"``) on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def set_fault(self, path: str, fault: Fault | None) -> None:
        """Install (or clear, with None) the fault of a URL path such as ``/primary/x.txt``."""
        with self._lock:
            if fault is None:
                self.faults.pop(path, None)
            else:
                self.faults[path] = fault

    def requests_for(self, path: str) -> list[Request]:
        """Logged requests to a URL path."""
        with self._lock:
            return [r for r in self.log if r.path == path]

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            f = self.faults.get(path)
            if f is None:
                return None
            if f.times is not None:
                if f.times <= 0:
                    return None
                f.times -= 1
            return f

    def _record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)


def _make_handler(state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # socket timeout: a stuck client cannot hold a thread forever

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def _send_plain(self, status: int, text: str, rng: str | None) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            state._record(Request(self.path, rng, status, len(body)))

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            rng = self.headers.get("Range")
            fault = state._take_fault(path)
            if fault is not None and fault.delay:
                state._stop.wait(min(fault.delay, MAX_DELAY_S))
            if fault is not None and fault.status is not None:
                self._send_plain(fault.status, f"fault {fault.status}", rng)
                return
            parts = unquote(path).lstrip("/").split("/", 1)
            rel = parts[1] if len(parts) == 2 else ""
            file = (state.root / rel).resolve()
            if (
                not rel
                or not file.is_file()
                or not str(file).startswith(str(state.root.resolve()) + "/")
            ):
                self._send_plain(404, "not found", rng)
                return
            data = (
                fault.body if (fault is not None and fault.body is not None) else file.read_bytes()
            )
            status, start = 200, 0
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "none"}
            if state.range_support:
                headers["Accept-Ranges"] = "bytes"
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes=") : -1])
                    if start >= len(data):
                        headers["Content-Range"] = f"bytes */{len(data)}"
                        self._send_plain(416, "range not satisfiable", rng)
                        return
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            sent = body
            if fault is not None and fault.cut_after is not None:
                sent = body[: fault.cut_after]
            pause = fault.throttle if fault is not None else 0.0
            step = 4096 if pause else max(len(sent), 1)
            pause = min(pause, MAX_DELAY_S * step / max(len(sent), 1))
            try:
                for i in range(0, len(sent), step):
                    self.wfile.write(sent[i : i + step])
                    self.wfile.flush()
                    if pause and state._stop.wait(pause):
                        break
            except OSError:
                pass
            self.close_connection = True
            state._record(Request(self.path, rng, status, len(sent)))

    return Handler


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LoopbackServer]:
    """A loopback server serving ``tmp_path / "www"`` (create files there)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve(root) as state:
        yield state


@contextmanager
def serve(root: Path, *, range_support: bool = True) -> Iterator[LoopbackServer]:
    """Run a LoopbackServer for ``root`` on 127.0.0.1 inside a ``with`` block."""
    state = LoopbackServer(root=root, range_support=range_support)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state._stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        time.sleep(0)  # let daemon handler threads observe the stop event
