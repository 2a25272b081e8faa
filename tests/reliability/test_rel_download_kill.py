"""A download killed with SIGKILL mid-transfer: the next run never accepts the partial
file; it resumes (or restarts) and ends with verified bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _rel_helpers import PYTHON, sha256_bytes, wait_for

CHUNK = 8 * 1024
SIZE = 384 * 1024


@dataclass
class SlowServer:
    """Serves ``data`` at ``/file.bin`` in 8 KiB pieces, ``delay`` seconds apart, with
    HTTP Range support; logs the Range header of every request."""

    data: bytes
    delay: float = 0.03
    ranges: list[str | None] = field(default_factory=list)
    port: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file.bin"


def _handler(state: SlowServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def log_message(self, *a: object) -> None:
            return

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            start = int(rng[len("bytes=") : -1]) if rng else 0
            body = state.data[start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(state.data) - 1}/{len(state.data)}"
                )
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for i in range(0, len(body), CHUNK):
                    if state.stop.is_set():
                        return
                    self.wfile.write(body[i : i + CHUNK])
                    self.wfile.flush()
                    time.sleep(state.delay)
            except OSError:
                pass
            self.close_connection = True

    return Handler


@contextmanager
def slow_server(data: bytes, delay: float) -> Iterator[SlowServer]:
    state = SlowServer(data=data, delay=delay)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


_CHILD = """
import sys
from gpt.data.download import download_sources
from gpt.data.sources import Source, SourceFile
url, sha, size, dest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
src = Source("blob", "test blob", (SourceFile("blob.bin", (url,), sha256=sha, size=size),))
print("starting", flush=True)
download_sources([src], dest=dest, progress=False, retries=1, timeout=20)
print("finished", flush=True)
"""


def _source(url: str, sha: str):
    from gpt.data.sources import Source, SourceFile

    return Source("blob", "test blob", (SourceFile("blob.bin", (url,), sha256=sha, size=SIZE),))


def _kill_mid_transfer(server: SlowServer, dest: Path, env: dict[str, str]) -> int:
    """Start the download in a child, SIGKILL it once a third of the bytes are on disk;
    returns the size of the partial file left behind."""
    part = dest / "blob.bin.part"
    proc = subprocess.Popen(
        [PYTHON, "-c", _CHILD, server.url, sha256_bytes(server.data), str(SIZE), str(dest)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: part.exists() and part.stat().st_size >= SIZE // 3,
            60,
            "a third of the download",
            proc,
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (dest / "blob.bin").exists(), "a killed download left a file under the final name"
    size = part.stat().st_size
    assert SIZE // 3 <= size < SIZE
    return size


@pytest.mark.parametrize("damage", [None, "garbage", "longer"])
def test_download_killed_mid_transfer_is_never_accepted(
    tmp_path: Path, sub_env: dict[str, str], damage: str | None
) -> None:
    from gpt.data.download import download_sources

    data = random.Random(7).randbytes(SIZE)
    dest = tmp_path / "datasets"
    with slow_server(data, delay=0.02) as server:
        kept = _kill_mid_transfer(server, dest, sub_env)
        part = dest / "blob.bin.part"
        if damage == "garbage":  # the bytes on disk are not what the server sent
            part.write_bytes(b"\0" * kept)
        elif damage == "longer":  # more bytes than the file has
            part.write_bytes(data + b"tail")
        server.delay = 0.0
        n_before = len(server.ranges)
        res = download_sources(
            [_source(server.url, sha256_bytes(data))],
            dest=dest,
            progress=False,
            retries=2,
            backoff=0.01,
        )
        second = server.ranges[n_before:]
    final = dest / "blob.bin"
    assert final.read_bytes() == data
    assert res[0].sha256 == sha256_bytes(data) and not res[0].skipped
    assert not part.exists()
    if damage is None:  # an intact partial file is continued where it stopped
        assert second == [f"bytes={kept}-"]
    elif damage == "garbage":  # resumed, failed verification, then fetched afresh
        assert second[0] == f"bytes={kept}-" and second[-1] is None
    else:
        assert second[-1] is None
    # and a third run trusts the verified file without fetching anything
    again = download_sources(
        [_source("http://127.0.0.1:9/unused", sha256_bytes(data))], dest=dest, progress=False
    )
    assert again[0].skipped and again[0].sha256 == sha256_bytes(data)


def test_final_file_replaced_by_partial_bytes_is_refetched(
    tmp_path: Path,
) -> None:
    """A final file that was cut short later (e.g. a copy killed mid-way) is not trusted."""
    from gpt.data.download import download_sources

    data = random.Random(8).randbytes(SIZE)
    dest = tmp_path / "datasets"
    with slow_server(data, delay=0.0) as server:
        download_sources([_source(server.url, sha256_bytes(data))], dest=dest, progress=False)
        (dest / "blob.bin").write_bytes(data[: SIZE // 2])
        res = download_sources([_source(server.url, sha256_bytes(data))], dest=dest, progress=False)
        assert len(server.ranges) == 2
    assert not res[0].skipped
    assert (dest / "blob.bin").read_bytes() == data
