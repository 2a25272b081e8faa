"""Resumable training state of :func:`gpt.train.train_lm`: its progress, the RNG states
of torch and of the loaders, and resuming from a ``last/`` checkpoint (written by one
process layout, resumed under any other).

What a checkpoint stores is split in two: the ``trainer_state`` (:func:`progress_state`)
holds only what the computation determines — two runs at the same step, or a run killed
and resumed, write it byte for byte the same — and the checkpoint's record
(:func:`progress_record`) holds the wall-clock part: the training seconds and the values
of the speed metrics. Resuming puts both back together."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt import distributed as gd
from gpt.errors import CheckpointError

log = logging.getLogger("gpt.train")

#: Version of the ``trainer_state`` a checkpoint stores.
STATE_VERSION = 1

#: Metric rows whose values are wall-clock measurements (kept in the checkpoint's
#: record, not in its trainer_state).
TIMED_METRICS = frozenset({"tokens_per_s"})


def loader_generators(loader: Any) -> tuple[torch.Generator | None, torch.Generator | None]:
    """The loader's own generator and, if different, its sampler's."""
    gen = getattr(loader, "generator", None)
    sampler = getattr(loader, "sampler", None)
    sgen = getattr(sampler, "generator", None)
    return gen, (sgen if sgen is not gen else None)


def capture_rng(train_loader: Any, val_loader: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    for name, loader in (("train", train_loader), ("val", val_loader)):
        gen, sgen = loader_generators(loader)
        if gen is not None:
            state[f"{name}_loader"] = gen.get_state()
        if sgen is not None:
            state[f"{name}_sampler"] = sgen.get_state()
    return state


def restore_rng(state: dict[str, Any], train_loader: Any, val_loader: Any) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, loader in (("train", train_loader), ("val", val_loader)):
        gen, sgen = loader_generators(loader)
        for key, g in ((f"{name}_loader", gen), (f"{name}_sampler", sgen)):
            if key in state:
                if g is None:
                    raise CheckpointError(
                        f"the checkpoint holds the {key} RNG state but the {name} loader "
                        "has no generator; build it with gpt.data.windows.make_loader"
                    )
                g.set_state(state[key])


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    position: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def has_checkpoint(last: Path) -> bool:
    """Whether ``last`` holds something to resume from; a ``last`` that a save killed
    mid-swap left aside (``.last.old-*``) is put back first."""
    from gpt.checkpoint import recover_checkpoint

    return last.exists() or recover_checkpoint(last) is not None


def load_resume(
    last: Path,
    engine: gd.TrainEngine,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    seed: int,
) -> tuple[Progress, dict[str, Any], dict[str, Any] | None]:
    """Load ``last`` into the engine's model and the optimizer (every rank) and return
    the progress, this rank's checkpoint-time RNG states and the epoch-start states."""
    from gpt.checkpoint import load_checkpoint

    # a LoRA model resumes with its adapter apart from the base, as it trains
    ck = load_checkpoint(last, map_location=engine.device, with_optimizer=True, merge=False)
    cfg = getattr(engine.model, "cfg", None)
    if cfg is not None and ck.config != cfg:
        raise CheckpointError(
            f"{last} holds a model with config {ck.config.to_dict()}, not the model being "
            f"trained ({cfg.to_dict()}); delete {last} or pass resume=False"
        )
    ts = ck.trainer_state
    timed = ck.record.get("timed_metrics") or {}
    if not ts or ts.get("version") != STATE_VERSION or ck.optimizer_state is None:
        raise CheckpointError(
            f"{last} has no usable trainer_state.json/optimizer.pt to resume from; "
            "delete it or pass resume=False"
        )
    if ts["steps_per_epoch"] != steps_per_epoch:
        raise CheckpointError(
            f"{last} was written with {ts['steps_per_epoch']} steps per epoch but the "
            f"training loader now has {steps_per_epoch} batches (data or batch size changed); "
            "delete it or pass resume=False"
        )
    engine.load_state(ck.model.state_dict(), optimizer, ck.optimizer_state)
    prog = Progress(
        step=int(ts["step"]),
        epoch=int(ts["epoch"]),
        position=int(ts["position"]),
        tokens_seen=int(ts["tokens_seen"]),
        train_seconds=float(ck.record.get("train_seconds") or ts.get("train_seconds") or 0.0),
        metrics=_with_timed(list(ts.get("metrics", [])), timed),
        samples=list(ts.get("samples", [])),
        finished=bool(ts.get("finished", False)),
    )
    rng = dict(ts["rng"])
    world, rank = gd.world_size(), gd.rank()
    saved_world = int(ts.get("world_size", 1))
    per_rank = ts.get("rank_rng") or [{k: rng[k] for k in ("torch", "cuda") if k in rng}]
    if saved_world != world:
        log.warning(
            "%s was written by %d process(es), resuming with %d: the batch order is the "
            "same, dropout masks are not",
            last, saved_world, world,
        )  # fmt: skip
    if rank < len(per_rank):
        rng.update(per_rank[rank])
    else:
        rng["torch"] = torch.Generator().manual_seed(seed + 7919 * prog.step + rank).get_state()
        rng.pop("cuda", None)
    return prog, rng, ts.get("epoch_rng")


def _is_timed(row: dict[str, Any]) -> bool:
    return row.get("name") in TIMED_METRICS


def _with_timed(metrics: list[dict[str, Any]], timed: dict[str, Any]) -> list[dict[str, Any]]:
    """``metrics`` (the trainer_state's) with the timed rows of the record put back at
    their places (``timed`` maps a row's index in the full list to the row)."""
    out = list(metrics)
    for index, row in sorted(((int(i), r) for i, r in timed.items()), key=lambda t: t[0]):
        out.insert(min(index, len(out)), row)
    return out


def progress_record(prog: Progress) -> dict[str, Any]:
    """The wall-clock part of the progress: what a checkpoint keeps in its record."""
    return {
        "train_seconds": prog.train_seconds,
        "timed_metrics": {str(i): r for i, r in enumerate(prog.metrics) if _is_timed(r)},
    }


def progress_state(
    prog: Progress,
    *,
    rng: dict[str, Any],
    epoch_start: dict[str, Any] | None,
    steps_per_epoch: int,
    total_steps: int,
    world: int,
    per_rank: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """The ``trainer_state`` a checkpoint stores: what :func:`load_resume` reads back
    (with :func:`progress_record`), without anything measured in wall-clock time."""
    return {
        "version": STATE_VERSION,
        "step": prog.step,
        "epoch": prog.epoch,
        "position": prog.position,
        "tokens_seen": prog.tokens_seen,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "finished": prog.finished,
        "metrics": [r for r in prog.metrics if not _is_timed(r)],
        "samples": prog.samples,
        "rng": rng,
        "epoch_rng": epoch_start if prog.position > 0 else None,
        "world_size": world,
        "rank_rng": per_rank if world > 1 else None,
    }
