"""Run a library function in ``nproc × nnodes`` processes under torchrun, or in this
process when that is one.

:func:`launchable` makes a training recipe do this by itself: a call with settings
whose ``distributed`` layout asks for more than one process re-launches the same
recipe under torchrun (its callbacks forwarded, rank 0's result returned), so a caller
makes the same typed call whatever the layout.

The function (``"gpt.recipes.pretrain:pretrain"``) gets its keyword arguments through a
JSON file (:mod:`gpt.distributed.codec`); the callbacks the caller gives
(``on_metrics``, ``on_sample``, …) become channels: rank 0 appends each call as a JSON
line to ``workdir/events.jsonl``, and this process forwards every line to the caller's
callback while the run goes on (order kept, nothing forwarded twice). Rank 0's return
value comes back through ``workdir/result.json`` as the same type (paths, settings
models and dataclasses are rebuilt).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import gpt
from gpt.distributed.codec import decode, encode, import_target, target_path
from gpt.distributed.context import resolve_backend, world_size
from gpt.distributed.settings import DistributedArgs
from gpt.distributed.worker import EVENTS, RESULT, SPEC
from gpt.errors import ConfigError, DistributedError, GPTFlowError

__all__ = ["launch_command", "launchable", "run_distributed", "scratch_dir"]

log = logging.getLogger(__name__)

STDOUT, STDERR, PID = "torchrun.out", "torchrun.err", "torchrun.pid"
_TAIL_LINES = 40

P = ParamSpec("P")
R = TypeVar("R")


def launch_command(args: DistributedArgs, workdir: Path) -> list[str]:
    """The ``python -m torch.distributed.run …`` command line for ``args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc)]
    if args.node_rank is not None and args.rdzv_endpoint is not None:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        cmd += ["--node-rank", str(args.node_rank), "--master-addr", host.strip("[]")]
        cmd += ["--master-port", port]
    elif args.rdzv_endpoint is not None:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
        cmd += ["--rdzv-id", args.rdzv_id]
    else:
        cmd += ["--standalone"]  # c10d rendezvous on a free local port
    cmd += ["--max-restarts", "0", "-m", "gpt.distributed.worker", str(workdir)]
    return cmd


def _child_env() -> dict[str, str]:
    """This environment, with the folder holding the imported ``gpt`` package first on
    PYTHONPATH so the workers import the same code."""
    env = dict(os.environ)
    root = str(Path(gpt.__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p != root]])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class _EventForwarder:
    """Reads complete lines appended to the events file and calls the callbacks."""

    def __init__(self, path: Path, callbacks: dict[str, Callable[..., Any]]) -> None:
        self.path = path
        self.callbacks = callbacks
        self.offset = 0
        self.forwarded = 0

    def pump(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            event = json.loads(line)
            fn = self.callbacks.get(event["callback"])
            if fn is not None:
                fn(*decode(event["args"]))
            self.forwarded += 1


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


def _rebuild_error(err: dict[str, Any]) -> GPTFlowError | None:
    """The child's gptflow error as the same class (or its nearest base that takes a
    message alone), else None."""
    try:
        cls = import_target(err["type"])
    except ConfigError:
        return None
    if not (isinstance(cls, type) and issubclass(cls, GPTFlowError)):
        return None
    for base in cls.__mro__:
        if isinstance(base, type) and issubclass(base, GPTFlowError):
            try:
                return base(err["message"])
            except TypeError:
                continue
    return None


def _child_failure(workdir: Path, rc: int, what: str) -> BaseException:
    """The error to raise for a failed torchrun: a gptflow error raised in a rank is
    raised again here (the DistributedError with the log tail as its cause)."""
    tail = _tail(workdir / STDERR)
    errors = []
    for f in sorted(workdir.glob("error-rank*.json")):
        with contextlib.suppress(OSError, ValueError):
            errors.append((int(f.stem.removeprefix("error-rank")), json.loads(f.read_text())))
    errors.sort(key=lambda e: e[0])
    summary = DistributedError(
        f"{what} failed (torchrun exit status {rc}); last lines of {workdir / STDERR}:\n{tail}"
    )
    # prefer a deliberate gptflow error over the collective failures it causes elsewhere
    for rank, err in errors:
        rebuilt = _rebuild_error(err)
        if rebuilt is not None:
            rebuilt.add_note(f"raised in rank {rank} of {what}")
            rebuilt.__cause__ = summary
            return rebuilt
    if errors:
        rank, err = errors[0]
        return DistributedError(
            f"{what} failed in rank {rank}: {err['type']}: {err['message']} "
            f"(torchrun exit status {rc}); last lines of {workdir / STDERR}:\n{tail}"
        )
    return summary


def _stop(proc: subprocess.Popen[bytes], workdir: Path) -> None:
    """End the torchrun this call started: SIGTERM (torchrun then stops its workers);
    if it is still there after 15 s, SIGKILL to it and to the workers it started (each
    in its own session, named by their ``rank<R>.pid`` files)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for f in workdir.glob("rank*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, OSError):
            os.kill(int(f.read_text()), signal.SIGKILL)


def run_distributed(
    target: str | Callable[..., Any],
    kwargs: dict[str, Any],
    args: DistributedArgs,
    *,
    workdir: Path,
    callbacks: dict[str, Callable[..., Any] | None] | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
    echo: bool = False,
) -> Any:
    """Call ``target(**kwargs, **callbacks)`` on ``args.world_size`` processes and return
    rank 0's result.

    ``target``: ``"package.module:function"`` (or the function itself, if importable by
    name). ``kwargs``: its keyword arguments — JSON values, paths, settings models
    (``gpt.config.Args``) and dataclasses of those. ``callbacks``: keyword arguments
    that are callables (e.g. ``{"on_metrics": sink, "on_sample": sink}``; None values
    are dropped); under torchrun only rank 0 gets them, and each call reaches the
    callable here, in this process, within ``poll_s`` seconds, with JSON-decoded
    arguments. ``echo``: copy torchrun's stderr (every rank's log lines, rank 0's
    progress bars) to this process's stderr as it comes.

    With ``args.world_size == 1`` the function runs in this process (no torchrun,
    no process group; ``workdir`` unused). Otherwise ``workdir`` (created; files of an
    earlier attempt replaced) holds ``spec.json``, ``events.jsonl``, ``result.json``,
    ``torchrun.out``/``torchrun.err``, the process ids (``torchrun.pid``,
    ``rank<R>.pid``) and any ``error-rank<R>.json``. A gptflow error
    raised in a rank is raised here as the same class; any other failure (a crash,
    SIGKILL, ``timeout_s``) raises :class:`~gpt.errors.DistributedError` with the tail of
    torchrun's stderr. On a multi-machine run only the machine that held rank 0 gets
    the result; the others return None.
    """
    cbs = {k: v for k, v in (callbacks or {}).items() if v is not None}
    clash = sorted(set(cbs) & set(kwargs))
    if clash:
        raise ConfigError(f"{clash} given both as kwargs and as callbacks")
    if not args.is_distributed:  # a plain call: the function need not be importable
        fn = import_target(target) if isinstance(target, str) else target
        return fn(**kwargs, **cbs)
    fn_path = target if isinstance(target, str) else target_path(target)

    resolve_backend(args.backend, str(kwargs.get("device", "auto")))  # fail early, here
    what = f"{fn_path} on {args.world_size} processes ({args.nnodes} node(s) × {args.nproc})"
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stale = [RESULT, EVENTS, STDOUT, STDERR, PID]
    for name in [*stale, *workdir.glob("error-rank*.json"), *workdir.glob("rank*.pid")]:
        (workdir / name).unlink(missing_ok=True)
    spec = {
        "target": fn_path,
        "kwargs": encode(kwargs, "kwargs"),
        "callbacks": sorted(cbs),
        "backend": args.backend,
        "strategy": args.strategy,
    }
    (workdir / SPEC).write_text(json.dumps(spec), encoding="utf-8")
    cmd = launch_command(args, workdir)
    log.info("running %s: %s", what, " ".join(cmd))
    forwarder = _EventForwarder(workdir / EVENTS, cbs)
    echoed = 0

    def pump() -> None:
        nonlocal echoed
        forwarder.pump()
        if echo:
            with open(workdir / STDERR, "rb") as f:
                f.seek(echoed)
                data = f.read()
            echoed += len(data)
            if data:
                sys.stderr.write(data.decode("utf-8", errors="replace"))
                sys.stderr.flush()

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(workdir / STDOUT, "wb") as out, open(workdir / STDERR, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, env=_child_env(), start_new_session=True
        )
        (workdir / PID).write_text(str(proc.pid), encoding="utf-8")
        try:
            while proc.poll() is None:
                pump()
                if deadline is not None and time.monotonic() > deadline:
                    _stop(proc, workdir)
                    raise DistributedError(
                        f"{what} did not finish within {timeout_s} s and was stopped; "
                        f"last lines of {workdir / STDERR}:\n{_tail(workdir / STDERR)}"
                    )
                time.sleep(poll_s)
            pump()
        except BaseException:
            _stop(proc, workdir)
            raise
    if proc.returncode != 0:
        raise _child_failure(workdir, proc.returncode, what)
    result_file = workdir / RESULT
    if not result_file.exists():
        if args.nnodes > 1:
            return None  # rank 0 ran on another machine
        raise DistributedError(f"{what} exited cleanly but wrote no {result_file}")
    return decode(json.loads(result_file.read_text(encoding="utf-8"))["result"])


def scratch_dir(out_dir: str | Path) -> Path:
    """Where torchrun's files of a recipe writing ``out_dir`` go: the hidden sibling
    ``.<name>.torchrun`` (beside the output, never inside it: a checkpoint folder is
    replaced as a whole when written)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.torchrun"


def launchable(recipe: Callable[P, R]) -> Callable[P, R]:
    """Make ``recipe`` run on the process layout its settings ask for.

    ``recipe`` takes its settings as ``args`` (with a ``distributed`` layout,
    :class:`~gpt.distributed.DistributedArgs`) and writes into ``out_dir``. Called with
    one process (the default), or inside a process group already (a torchrun rank), it
    is a plain call. Otherwise the same call runs under torchrun
    (:func:`run_distributed`): the keyword arguments cross as JSON
    (:mod:`gpt.distributed.codec`), the callables among them (``on_metrics``,
    ``on_sample``, …) are forwarded from rank 0, and rank 0's result is returned.
    torchrun's files go to :func:`scratch_dir` of ``out_dir``: removed when the
    training succeeds, kept when it fails (``torchrun.err`` holds every rank's log).
    """
    signature = inspect.signature(recipe)

    @functools.wraps(recipe)
    def call(*a: P.args, **kw: P.kwargs) -> R:
        given = signature.bind(*a, **kw).arguments
        layout = getattr(given.get("args"), "distributed", None)
        if layout is None or not layout.is_distributed or world_size() > 1:
            return recipe(*a, **kw)
        kwargs = {k: v for k, v in given.items() if not callable(v)}
        callbacks = {k: v for k, v in given.items() if callable(v)}
        scratch = scratch_dir(given["out_dir"])
        what = target_path(call)
        log.info(
            "%s: training on %d processes (%d node(s) × %d, %s, backend %s); torchrun files "
            "in %s",
            what, layout.world_size, layout.nnodes, layout.nproc, layout.strategy,
            layout.backend, scratch,
        )  # fmt: skip
        try:
            result = run_distributed(
                what,
                kwargs,
                layout,
                workdir=scratch,
                callbacks=callbacks,
                echo=bool(given.get("progress", False)),
            )
        except BaseException:
            if scratch.exists():
                log.warning("%s failed; torchrun's files are kept in %s", what, scratch)
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        if result is None:
            raise DistributedError(
                f"{what}: global rank 0 of the {layout.nnodes}-node training ran on another "
                "machine, which holds the result; this machine has none to return"
            )
        return result

    return call
