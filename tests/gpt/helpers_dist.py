"""Targets for tests/gpt/test_distributed.py that run inside torchrun's processes (the test
puts this folder on the workers' PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gpt.distributed.launch import asks_torchrun, relaunch
from gpt.layout import DistributedArgs


def pretrain_killed_at(kill_at: int, workdir: str, **kwargs: Any) -> Any:
    """:func:`gpt.recipes.pretrain.pretrain`, except that once rank 0 has sent the rows
    of step ``kill_at`` it SIGKILLs the whole job at once — torchrun's agent, every rank
    (their ``rank<R>.pid`` files in ``workdir``) and itself — as a machine crash would."""
    from gpt.recipes.pretrain import pretrain

    forward = kwargs.pop("on_metrics", None)

    def on_metrics(rows: list[dict[str, Any]]) -> None:
        if forward is not None:
            forward(rows)
        if max(r["step"] for r in rows) >= kill_at:
            me = os.getpid()
            others = [int(p.read_text()) for p in Path(workdir).glob("rank*.pid")]
            os.kill(os.getppid(), signal.SIGKILL)  # the torchrun agent
            for pid in others:
                if pid != me:
                    os.kill(pid, signal.SIGKILL)
            os.kill(me, signal.SIGKILL)

    return pretrain(**kwargs, on_metrics=on_metrics)


class Layout(BaseModel):
    """Settings that carry only a process layout (what :func:`~gpt.distributed.launch.asks_torchrun` reads)."""

    distributed: DistributedArgs = DistributedArgs()


def gather(args: Layout, out_dir: Path, obj: Any) -> list[Any]:
    """Every rank's ``obj``, as rank 0 gathers them."""
    if asks_torchrun(args):
        return relaunch(gather, locals())
    from gpt.distributed.context import all_gather_objects

    return all_gather_objects(obj)


def parse(args: Layout, out_dir: Path, text: str) -> Any:
    """``json.loads(text)``: fails on every rank for text that is not JSON."""
    if asks_torchrun(args):
        return relaunch(parse, locals())
    return json.loads(text)


def in_turn(jobs: dict[str, list[Any]], **channels: Any) -> dict[str, Any]:
    """Several trainings one after another in this one torchrun job (a launch costs the
    agent and every rank importing torch; the test pays that once for all of them):
    ``jobs`` maps a name to ``[target, kwargs]``; the callback ``<name>__<callback>``
    becomes that target's ``<callback>`` (None on ranks other than 0). ``{name: result}``."""
    from gpt.distributed.codec import import_target

    results = {}
    for name, (target, kwargs) in jobs.items():
        prefix = f"{name}__"
        own = {k.removeprefix(prefix): v for k, v in channels.items() if k.startswith(prefix)}
        results[name] = import_target(target)(**kwargs, **own)
    return results
