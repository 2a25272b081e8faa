"""Running a training stage's library function in one process or under torchrun.

The training stages (pretrain, finetune_spam, finetune_instruct) call their library
function through :func:`train`, always: with ``distributed.nproc = 1`` (the default) it
is a plain call in this process, exactly as before; with more processes
:func:`gpt.distributed.run_distributed` runs it under torchrun and forwards rank 0's
``on_metrics`` / ``on_sample`` calls to the stage's sinks here, so metrics and samples
reach the stage folder and the catalog as they would from one process.

The training still writes into the stage's work folder (``<key>.partial``, kept after a
crash so a rerun resumes from its checkpoint, whatever the process layout). torchrun's
own files (spec, events, result, logs, process ids) go to a scratch folder beside it,
``<key>.torchrun``: removed when the training succeeds, kept when it fails (its
``torchrun.err`` holds every rank's log).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import DistributedError

if TYPE_CHECKING:  # kept light: `gptflow catalog rebuild` imports SCRATCH_SUFFIX
    from gpt.distributed import DistributedArgs
    from tasks.stages.base import StageRun

#: Suffix of the scratch folder beside a stage's work folder.
SCRATCH_SUFFIX = ".torchrun"


def scratch_dir(run: StageRun) -> Path:
    """Where torchrun's files of ``run`` go: ``<key>.torchrun`` beside the work folder."""
    return run.work.parent / f"{run.key}{SCRATCH_SUFFIX}"


def train(
    run: StageRun,
    target: Callable[..., Any],
    kwargs: dict[str, Any],
    layout: DistributedArgs,
    *,
    callbacks: dict[str, Callable[..., Any] | None],
) -> Any:
    """``target(**kwargs, **callbacks)`` on ``layout.world_size`` processes (this one
    when that is 1); rank 0's result. ``target`` is a library function importable by
    its name (torchrun's workers import it); ``kwargs`` are JSON values, paths, settings
    and dataclasses of those (:mod:`gpt.distributed.codec`)."""
    from gpt.distributed import run_distributed

    scratch = scratch_dir(run)
    log = run.log()
    if layout.is_distributed:
        log.info(
            "%s: training on %d processes (%d node(s) × %d, %s, backend %s); torchrun files "
            "in %s",
            run.stage, layout.world_size, layout.nnodes, layout.nproc, layout.strategy,
            layout.backend, scratch,
        )  # fmt: skip
    try:
        result = run_distributed(
            target,
            kwargs,
            layout,
            workdir=scratch,
            callbacks=callbacks,
            echo=run.progress,
        )
    except BaseException:
        if scratch.exists():
            log.warning("%s: training failed; torchrun's files are kept in %s", run.stage, scratch)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    if result is None and layout.is_distributed:
        raise DistributedError(
            f"{run.stage}: global rank 0 of the {layout.nnodes}-node training ran on another "
            "machine, which commits the stage; this machine has no result to record"
        )
    return result


def relative_to_work(run: StageRun, path: str | Path) -> str:
    """``path`` (a folder or file the training wrote under the work folder) relative to
    it, as the stage's typed result stores it."""
    return Path(path).resolve().relative_to(run.work.resolve()).as_posix()
