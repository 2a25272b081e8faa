"""A notebook in another process: a Python session holding one DuckDB connection to the
catalog file people open (read-only or read-write), answering queries sent on stdin —
what readers do while gptflow runs write."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

_NOTEBOOK = textwrap.dedent(
    """
    import os, sys, time, duckdb
    path, read_only, after_publish = sys.argv[1], sys.argv[2] == "ro", sys.argv[3] == "1"
    if after_publish:  # open the file a writer publishes next (a new inode at the path)
        first = os.stat(path).st_ino
        deadline = time.monotonic() + 900
        while os.stat(path).st_ino == first and time.monotonic() < deadline:
            time.sleep(0.05)
    con = duckdb.connect(path, read_only=read_only)
    print("open", flush=True)
    for line in sys.stdin:
        cmd, _, sql = line.strip().partition(" ")
        if cmd == "sql":
            print(con.execute(sql).fetchone()[0], flush=True)
        elif cmd == "write":
            con.execute(sql)
            print("wrote", flush=True)
        elif cmd == "reconnect":
            con.close()
            con = duckdb.connect(path, read_only=read_only)
            print("open", flush=True)
        elif cmd == "quit":
            break
    con.close()
    """
)


class Notebook:
    """Holds ``path`` open from another process. ``after_publish``: it opens the file
    only once a writer has published a new one (call :meth:`wait_open`)."""

    def __init__(self, path: Path, *, read_only: bool, after_publish: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _NOTEBOOK, str(path), "ro" if read_only else "rw",
             "1" if after_publish else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        if not after_publish:
            self.wait_open()

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line and self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise AssertionError(f"the notebook ended: {self.proc.stderr.read()}")
        return line

    def wait_open(self) -> None:
        """Until the notebook holds its connection."""
        assert self._read() == "open"

    def ask(self, cmd: str) -> str:
        """``sql SELECT …`` (the first value), ``write SQL``, ``reconnect``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self.ask("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
