"""glibc malloc settings for training on the CPU: keep freed memory for reuse instead of
handing it back to the kernel after every step.

A training step allocates and frees the same large buffers every time (a 124M model at
2 × 256 tokens: ~0.8 GB per step — the logits and their log-softmax and gradients,
[tokens, 50,257] floats each, and the embedding and head weight gradients). glibc serves
every block over its mmap threshold (32 MB at most) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so each step page-faults that memory in again, 4 KiB at a
time, and the kernel zeroes every page: ~200,000 faults and 5-10 % of a step's CPU time
on this machine kind. :data:`MALLOC_TUNABLES` turns that off — no mmap'd blocks, no
trimming of the heap's top, one arena for all threads (Prefect runs stages in worker
threads, whose arenas hold at most 64 MB per heap and would mmap the big blocks anyway)
— and :func:`release_free_memory` hands the kept memory back when training ends.

glibc reads these settings once, when a process starts (``GLIBC_TUNABLES``): the
``gptflow`` command re-executes itself with them (:func:`tunables_env`), and the Prefect
deployments set them for their flow-run processes (``prefect.yaml``). They change where
memory comes from, never a computed number. Setting any ``glibc.malloc.*`` tunable
yourself keeps yours and glibc's defaults for the rest: e.g.
``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` (its default value) runs with glibc's
defaults. (Not ``mmap_max`` or the thresholds: setting any of those also turns off
glibc's adaptive mmap threshold, which then maps every block over 128 KiB afresh.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Mapping

__all__ = ["MALLOC_TUNABLES", "is_glibc", "release_free_memory", "tunables_env"]

#: What ``gptflow`` adds to ``GLIBC_TUNABLES``: no mmap'd blocks (every allocation from
#: the heap, reused after a free), never trim the heap's top (2**62 bytes: unreachable),
#: one arena shared by all threads.
MALLOC_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4611686018427387904"
    ":glibc.malloc.arena_max=1"
)


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc (where the tunables mean something)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tunables_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with :data:`MALLOC_TUNABLES` added to ``GLIBC_TUNABLES``, or None when
    there is nothing to add: not glibc, or some ``glibc.malloc.*`` tunable is already set
    (the user's choice, or this process was already started with them)."""
    if not is_glibc():
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None
    value = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
    return {**environ, "GLIBC_TUNABLES": value}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not is_glibc():
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``); called when
    a training run ends, since :data:`MALLOC_TUNABLES` keeps them while it runs. Returns
    whether any memory was released (False off glibc)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
