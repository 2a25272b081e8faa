"""A loopback S3 endpoint for benchmarks and tests: ``moto_server`` (from ``moto[server]``)
on a free port, with one bucket created, stopped afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def moto_executable() -> str | None:
    """The ``moto_server`` command beside this interpreter or on PATH, or None."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    return exe if Path(exe).exists() else None


@contextlib.contextmanager
def moto_s3(bucket: str, *, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port, create ``bucket`` and yield the
    endpoint URL. Raises FileNotFoundError when moto[server] is not installed."""
    exe = moto_executable()
    if exe is None:
        raise FileNotFoundError("moto_server not found (pip install 'moto[server]')")
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                s3.create_bucket(Bucket=bucket)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
