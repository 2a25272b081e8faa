"""What each torchrun process runs: ``python -m gpt.distributed.worker WORKDIR``.

It reads ``WORKDIR/spec.json`` (written by :func:`gpt.distributed.run_distributed`),
joins the process group, calls the target with the decoded keyword arguments and, on
rank 0, the callbacks as channels into ``WORKDIR/events.jsonl``; rank 0 writes the
result to ``WORKDIR/result.json``. Each rank records its process id in
``WORKDIR/rank<R>.pid``; a rank that fails writes ``WORKDIR/error-rank<R>.json`` (type,
message, traceback) before exiting non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

SPEC, RESULT, EVENTS = "spec.json", "result.json", "events.jsonl"


def pid_file(workdir: Path, rank: int) -> Path:
    """Where rank ``rank`` records its process id."""
    return Path(workdir) / f"rank{rank}.pid"


def error_file(workdir: Path, rank: int) -> Path:
    """Where rank ``rank`` records its failure."""
    return Path(workdir) / f"error-rank{rank}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EventChannel:
    """A callback that appends its (encoded) arguments as one JSON line
    ``{"callback": name, "args": [...]}`` to the events file, flushed per call, so the
    launching process can forward it while the run goes on."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def __call__(self, *args: Any) -> None:
        from gpt.distributed.codec import encode

        line = json.dumps({"callback": self.name, "args": encode(list(args), self.name)})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def main(argv: list[str]) -> int:
    """Run the spec in ``argv[1]``; the process's exit status."""
    workdir = Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    pid_file(workdir, rank).write_text(str(os.getpid()), encoding="utf-8")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    import gpt.distributed.context as context
    from gpt.distributed.codec import decode, encode, import_target

    try:
        spec = json.loads((workdir / SPEC).read_text(encoding="utf-8"))
        kwargs = decode(spec["kwargs"])
        context.init_from_env(
            spec["backend"], spec["strategy"], device=str(kwargs.get("device", "auto"))
        )
        target = import_target(spec["target"])
        for name in spec["callbacks"]:
            kwargs[name] = EventChannel(workdir / EVENTS, name) if rank == 0 else None
        result = target(**kwargs)
        if rank == 0:
            write_json_atomic(workdir / RESULT, {"result": encode(result, "result")})
        context.barrier()
    except BaseException as exc:
        cls = type(exc)
        write_json_atomic(
            error_file(workdir, rank),
            {
                "type": f"{cls.__module__}:{cls.__qualname__}",
                "message": str(exc),
                "traceback": traceback.format_exc(),
            },
        )
        raise
    finally:
        context.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
