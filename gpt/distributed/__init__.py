"""Multi-process training with torch.distributed.

- :class:`DistributedArgs`: the ``distributed`` settings of a training stage;
- :func:`run_distributed`: run a library function under torchrun (or in-process for a
  single process) and get rank 0's result, with callbacks forwarded through a file;
  :func:`gpt.distributed.launch.launchable` makes a training recipe do that by itself
  when its settings' ``distributed`` layout asks for more than one process;
- rank/world helpers (:func:`rank`, :func:`world_size`, :func:`is_main`, …) that the
  training loops use and that are trivial without a process group;
- :class:`TrainEngine`: DDP / FSDP2 wrapping with single-process checkpoint layout;
- :func:`lm_step_sharded` / :func:`evaluate_lm_sharded`: the language model's
  data-parallel step and evaluation.
"""

from __future__ import annotations

from gpt.distributed.context import (
    all_gather_objects,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    device_for_rank,
    init_from_env,
    is_distributed,
    is_main,
    local_rank,
    main_first,
    rank,
    require_divisible,
    resolve_backend,
    shard,
    shutdown,
    strategy,
    world_size,
)
from gpt.distributed.launch import launch_command, run_distributed
from gpt.distributed.lm import evaluate_lm_sharded, lm_step_sharded
from gpt.distributed.parallel import TrainEngine
from gpt.distributed.settings import Backend, DistributedArgs, Strategy

__all__ = [
    "Backend",
    "DistributedArgs",
    "Strategy",
    "TrainEngine",
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "device_for_rank",
    "evaluate_lm_sharded",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launch_command",
    "lm_step_sharded",
    "local_rank",
    "main_first",
    "rank",
    "require_divisible",
    "resolve_backend",
    "run_distributed",
    "shard",
    "shutdown",
    "strategy",
    "world_size",
]
