"""A fork server for tests that start several Python children (kill-and-resume runs,
`prefect …` commands).

A child Python importing torch and Prefect costs 3-4 CPU-s before it does anything. The
server (``python helpers_fork.py``, driven by :class:`ForkServer`) imports those
third-party libraries once and forks each child from itself: every child is a process
of its own (its own pid, files, exit code; SIGKILL kills only it) that starts without a
single project (``gpt``/``tasks``/``flows``) module, as a fresh interpreter would, and
runs ``python -c CODE ARGS…`` or ``python SCRIPT ARGS…`` as that command would.

The server reads one JSON request a line on stdin (``name``, ``argv``, ``stdout`` and
``stderr`` file paths, optionally the child's whole ``env``) and answers ``START name
pid`` once the child is forked and ``EXIT name code`` when it ended (``-9``: killed by
SIGKILL). It ends once stdin is closed and every child ended. A child's environment is
the server's unless the request gives one; Prefect reads its settings when imported, so
the server's environment must hold the ``PREFECT_*`` settings its children use.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

#: Third-party libraries the children import, loaded once before forking (the default of
#: ``preload``). Each loads no project module and starts no thread (duckdb starts one when
#: imported, so each child imports it itself); the server checks both before every fork.
#: ``torch._dynamo`` is what a torch optimizer imports when built (~1.1 CPU-s a child).
TORCH = ("torch", "torch._dynamo")
SHARED = (*TORCH, "numpy", "pandas", "tiktoken", "prefect", "pydantic", "sklearn")
PROJECT = ("gpt", "tasks", "flows")


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _run_child(argv: list[str]) -> int:
    """Run ``python ARGV`` in this (forked) process; its exit code."""
    try:
        # sys.path[0] is the server's folder: the command's own, as Python sets it
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def serve(preload: list[str]) -> int:
    """The server loop (module docstring), after importing ``preload``."""
    for name in preload:
        importlib.import_module(name)
    children: dict[int, str] = {}
    open_input = True
    while open_input or children:
        if open_input and select.select([sys.stdin], [], [], 0.2)[0]:
            line = sys.stdin.readline()
            if not line:
                open_input = False
                continue
            req = json.loads(line)
            project = sorted(m for m in sys.modules if m.split(".", 1)[0] in PROJECT)
            if project or _threads() != 1:
                print(f"cannot fork a clean child: project modules {project}, "
                      f"{_threads()} threads", file=sys.stderr, flush=True)  # fmt: skip
                print(f"EXIT {req['name']} 70", flush=True)
                continue
            pid = os.fork()
            if pid == 0:  # the child: its own output files, then the command
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.stdin.close()
                if req.get("env") is not None:
                    os.environ.clear()
                    os.environ.update(req["env"])
                code = 1
                try:
                    code = _run_child(req["argv"])
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = req["name"]
            print(f"START {req['name']} {pid}", flush=True)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(f"EXIT {children.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)
        if not open_input and children:
            time.sleep(0.2)
    return 0


class ForkServer:
    """Children forked by one server process: ``start`` one by name, ``finish`` it for
    ``(code, stdout, stderr)`` (killed when it outlives its timeout); ``close`` (or the
    ``with`` block's end) ends the server, killing what still runs. ``preload``: the
    libraries the server imports for its children (only what they all import pays)."""

    def __init__(self, env: dict[str, str], logs: Path, preload: tuple[str, ...] = SHARED) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *preload],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pids: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self._buf = b""

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Fork ``python ARGV`` as the child ``name``, in ``env`` if given (returns once it
        runs)."""
        req = {"name": name, "argv": argv, "stdout": str(self._out(name, "out")),
               "stderr": str(self._out(name, "err")), "env": env}  # fmt: skip
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 120
        while name not in self.pids and name not in self.codes:
            if not self._read(deadline):
                raise RuntimeError(f"the fork server did not start {name}")

    def finish(self, name: str, timeout: float) -> tuple[int, str, str]:
        """``(exit code, stdout, stderr)`` of ``name`` once it ended; SIGKILLed first when
        it outlives ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while name not in self.codes:
            if not self._read(deadline) and name in self.pids:
                os.kill(self.pids[name], signal.SIGKILL)  # outlived its timeout
                deadline = time.monotonic() + 60
        text = [p.read_text() if p.exists() else "" for p in (self._out(name, "out"),
                                                               self._out(name, "err"))]  # fmt: skip
        return self.codes[name], text[0], text[1]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            for name, pid in self.pids.items():
                if name not in self.codes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _out(self, name: str, kind: str) -> Path:
        return self.logs / f"{name}.{kind}"

    def _read(self, deadline: float) -> bool:
        """Take one line of the server's answers; False when none came by ``deadline``."""
        while b"\n" not in self._buf:
            wait = max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                return False
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (code {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        word, name, value = [*line.decode().split(), "", "", ""][:3]
        if word == "START":
            self.pids[name] = int(value)
        elif word == "EXIT":
            self.codes[name] = int(value)
        return True


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
