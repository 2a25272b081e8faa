"""Throwaway servers for tests: a PostgreSQL cluster (DuckLake metadata) and a moto S3
endpoint. Plain context managers; ``conftest.py`` wraps them as fixtures.

Missing PostgreSQL binaries skip the tests that need them on a developer's machine, but
fail them under CI (``_ci.in_ci``): there, a skip would hide that the suite did not run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from _ci import unavailable


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str) -> None:
    unavailable(f"{reason}; the CI script must install it")


def pg_binary(name: str) -> str | None:
    """``name`` (initdb, pg_ctl, psql) on PATH or in Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


@dataclasses.dataclass
class PostgresServer:
    """A running cluster on 127.0.0.1 with trust authentication for ``user``."""

    host: str
    port: int
    user: str
    psql: str

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its name."""
        name = name or f"lake_{uuid.uuid4().hex[:12]}"
        self.sql(f'CREATE DATABASE "{name}"')
        return name

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql; returns its unaligned output."""
        out = subprocess.run(
            [self.psql, *self.conninfo(database), "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def conninfo(self, database: str) -> list[str]:
        """psql's connection arguments for ``database``."""
        return ["-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database]

    def ducklake_url(self, database: str) -> str:
        """The DuckLake URL of ``database`` on this server."""
        return (
            f"ducklake:postgres:dbname={database} host={self.host} port={self.port} "
            f"user={self.user}"
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb a cluster into a temporary folder, start it on a free port, stop and remove
    it afterwards. ``initdb`` refuses root: as root it runs as the ``postgres`` user."""
    binaries = {n: pg_binary(n) for n in ("initdb", "pg_ctl", "psql")}
    absent = [n for n, p in binaries.items() if p is None]
    if absent:
        _missing(f"PostgreSQL binaries {absent} not found (apt-get install postgresql)")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gptflow-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            _missing("running as root and no 'postgres' user to run initdb as")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
    data = root / "data"
    port = free_port()
    pg_ctl = str(binaries["pg_ctl"])
    initdb_options = ["--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
    try:
        subprocess.run(
            [*prefix, str(binaries["initdb"]), "-D", str(data), *initdb_options],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
        # -l: the server's output goes to a file, so no pipe of ours stays open behind it
        subprocess.run(
            [
                *prefix,
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        yield PostgresServer("127.0.0.1", port, "postgres", str(binaries["psql"]))
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class S3Server:
    """A moto S3 endpoint with one bucket; credentials are moto's dummies."""

    endpoint: str
    bucket: str
    key_id: str = "test"
    secret: str = "test"

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys under ``prefix``."""
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """``moto_server`` on a free loopback port with a fresh bucket; stopped afterwards."""
    from benchmarks.s3_stub import moto_executable, moto_s3

    if moto_executable() is None:
        _missing("moto_server not found (pip install 'moto[server]')")
    with moto_s3("gptflow-lake") as endpoint:
        yield S3Server(endpoint, "gptflow-lake")
