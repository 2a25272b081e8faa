"""The model as a data-parallel training loop drives it: DDP or FSDP2 under a process
group, the plain module otherwise, with full (unsharded) state for checkpoints.

:class:`TrainEngine` gives the loop three things that differ by strategy: the module
to run training steps through (``train_module``), the module for evaluation and
sampling (``eval_module``), and checkpoint state in the single-process layout
(``full_state`` / ``load_state``), so a checkpoint written by 1, 2 or N processes, with
either strategy, resumes under any of them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from gpt.distributed.context import is_distributed, is_main, strategy, world_size

__all__ = ["TrainEngine", "optimizer_state_by_index", "optimizer_state_by_name"]

log = logging.getLogger(__name__)


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict keyed by parameter name (what
    ``torch.distributed.checkpoint.state_dict`` returns) in torch's usual layout keyed
    by position (0, 1, … across the parameter groups, in order)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_index`: position ``i`` becomes
    ``names[i]`` (the optimizer's parameters in order)."""
    it: Iterator[str] = iter(names)
    by_id: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        fqns = []
        for i in group["params"]:
            by_id[int(i)] = next(it)
            fqns.append(by_id[int(i)])
        groups.append({**group, "params": fqns})
    return {"state": {by_id[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}


class TrainEngine:
    """Wraps ``model`` (a plain module on ``device``) for the current process group.

    - one process: everything is ``model`` itself;
    - ``ddp``: ``train_module`` is ``DistributedDataParallel(model)`` (gradients averaged
      over the ranks during backward); evaluation runs on ``model``;
    - ``fsdp``: a copy of ``model`` is sharded with FSDP2 ``fully_shard`` (each block,
      then the root) and trained; ``model`` is moved to the CPU meanwhile and carries
      the gathered full weights for checkpoints, and gets the final weights back (on
      its device) from :meth:`finish` — on rank 0 only (the other ranks' copy keeps
      its initial weights).
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.strategy = strategy() if is_distributed() else "single"
        self._names = _trainable_names(model)
        self._sharded: nn.Module | None = None
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.train_module: nn.Module = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
            self.eval_module: nn.Module = model
        elif self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model.to("cpu")
            sharded = copy.deepcopy(model)
            mesh = init_device_mesh(device.type, (world_size(),))
            for block in getattr(sharded, "blocks", []):
                fully_shard(block, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
            self._sharded = sharded
            self.train_module = self.eval_module = sharded
        else:
            self.train_module = self.eval_module = model

    @contextlib.contextmanager
    def unsharded(self) -> Iterator[nn.Module]:
        """``eval_module`` with the root's own parameters gathered, for code that calls
        its submodules or methods other than ``forward`` (e.g. generation, which runs
        ``hidden``). Collective under FSDP: every rank must enter it."""
        if self._sharded is None:
            yield self.eval_module
            return
        self._sharded.unshard()  # type: ignore[operator]
        try:
            yield self._sharded
        finally:
            self._sharded.reshard()  # type: ignore[operator]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (sharded ones under FSDP)."""
        return [p for p in self.train_module.parameters() if p.requires_grad]

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, dict[str, Any]]:
        """``(module holding the full weights, optimizer state_dict keyed by position)``
        for a checkpoint. Collective under FSDP (every rank must call it); the values are
        meaningful on rank 0."""
        if self._sharded is None:
            return self.model, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(
            self._sharded,
            optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if not is_main():
            return self.model, {}
        self.model.load_state_dict(msd)
        return self.model, optimizer_state_by_index(osd)

    def load_state(
        self,
        model_state: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        optimizer_state: dict[str, Any],
    ) -> None:
        """Load full (single-process layout) weights and optimizer state on every rank."""
        if self._sharded is None:
            self.model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        self.model.load_state_dict(model_state)
        set_state_dict(
            self._sharded,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optimizer_state_by_name(optimizer_state, self._names),
            options=StateDictOptions(full_state_dict=True),
        )

    def finish(self) -> None:
        """Put the trained weights into ``model`` (FSDP: gathered onto rank 0, and
        ``model`` moved back to its device)."""
        if self._sharded is None:
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        msd = get_model_state_dict(
            self._sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if is_main():
            self.model.load_state_dict(msd)
        self.model.to(self.device)
        self._sharded = None
        self.train_module = self.eval_module = self.model
