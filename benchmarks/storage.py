"""``shared_artifacts``: what an object-store artifacts root costs over a local folder,
for the stage folders of one smoke run (one committed folder per stage).

Three operations, each summed over the folders, local folder vs ``s3://`` root:

- **publish**: ``StageStore.commit`` of a filled work folder (local: hash + rename;
  S3: hash + upload + listing + conditional manifest put + the local copy's rename),
- **cold read**: a cache hit with nothing local (S3: manifest + listing + download +
  sha256 of every file),
- **warm read**: a cache hit with the verified local copy present (S3: manifest +
  listing + the local check).

Method: one untimed warm-up round, then rounds alternating which side goes first, the
median of the repeats reported with min and max. Against a loopback S3 endpoint (moto,
in memory) the figures are the floor of the overhead: a real endpoint adds its latency
and bandwidth.

    python -m benchmarks.storage --stages ARTIFACTS/stages [--endpoint URL] [--repeats N]

Without ``--endpoint`` a ``moto_server`` is started on a free port (``moto[server]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.core import BenchResult, BenchSkipped, spread
from benchmarks.s3_stub import moto_executable, moto_s3

__all__ = ["bench_shared_artifacts"]


def smoke_folders(stages: Path) -> list[tuple[str, str, Path]]:
    """One committed folder per stage: ``(stage, key, folder)``."""
    out = []
    for stage_dir in sorted(p for p in stages.iterdir() if p.is_dir()):
        for folder in sorted(stage_dir.iterdir()):
            if folder.is_dir() and "." not in folder.name and (folder / "manifest.json").exists():
                out.append((stage_dir.name, folder.name, folder))
                break
    return out


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    """A loopback moto S3 server with the bucket ``bench`` (stopped afterwards)."""
    if moto_executable() is None:
        raise BenchSkipped("shared_artifacts needs an S3 endpoint: --endpoint, or moto[server]")
    with moto_s3("bench") as url:
        yield url


def _sides(
    stores: dict[str, Any], folders: list[tuple[str, str, Path]], held: dict[tuple, Any]
) -> dict:
    """Per operation and side: (prepare, timed op) callables. ``held``: the leases the
    commits run under (the caller releases what is left)."""

    def fill(store) -> None:  # untimed: the stage body's output in a fresh work folder
        if hasattr(store, "remote"):  # a first publish: a prefix nobody wrote yet
            from tasks.store.objects import ObjectRoot

            store.remote = ObjectRoot(f"{store.url}/{uuid.uuid4().hex[:8]}/stages")
        for stage, key, src in folders:
            old = held.pop((id(store), stage, key), None)
            if old is not None:
                old.release()
            lease = held[(id(store), stage, key)] = store.lease(stage, key, "bench")
            lease.acquire()
            work = store.fresh_work_dir(stage, key, lease, resume=False)
            shutil.rmtree(work)
            shutil.copytree(src, work, ignore=shutil.ignore_patterns("manifest.json"))

    def commit(store) -> None:
        for stage, key, src in folders:
            manifest = json.loads((src / "manifest.json").read_text())
            keep = ("producer_run_id", "out", "args", "inputs", "code", "rows", "device")
            store.commit(
                stage, key, {k: manifest.get(k) for k in keep}, held[(id(store), stage, key)]
            )

    def lookup(store) -> None:
        for stage, key, _ in folders:
            manifest, reason = store.lookup(stage, key)
            if manifest is None:
                raise RuntimeError(f"{stage}/{key} is not a hit: {reason}")

    def drop_local(store) -> None:
        if store.root.exists():
            shutil.rmtree(store.root)

    def nothing(store) -> None:
        return None

    ops: dict[str, dict[str, tuple[Callable, Callable]]] = {}
    for side, store in stores.items():
        ops.setdefault("publish", {})[side] = (lambda s=store: fill(s), lambda s=store: commit(s))
        cold_prep = (lambda s=store: drop_local(s)) if side == "s3" else (lambda s=store: None)
        ops.setdefault("cold read", {})[side] = (cold_prep, lambda s=store: lookup(s))
        ops.setdefault("warm read", {})[side] = (
            lambda s=store: nothing(s),
            lambda s=store: lookup(s),
        )
    return ops


def bench_shared_artifacts(
    stages: Path, *, endpoint: str | None = None, repeats: int = 5
) -> list[BenchResult]:
    """The three operations (module docstring), local vs S3; one row each."""
    from tasks.store.folder import StageStore
    from tasks.store.object_store import ObjectStageStore

    folders = smoke_folders(Path(stages))
    if not folders:
        raise BenchSkipped(f"no committed stage folders under {stages}")
    mb = (
        sum(
            m["bytes"]
            for _, _, d in folders
            for m in json.loads((d / "manifest.json").read_text())["files"].values()
        )
        / 1e6
    )
    with contextlib.ExitStack() as stack:
        if endpoint is None:
            endpoint = stack.enter_context(moto_endpoint())
            bucket = "bench"
        else:
            bucket = os.environ.get("GPTFLOW_BENCH_BUCKET", "bench")
        os.environ.setdefault("GPTFLOW_ARTIFACTS_S3_KEY_ID", "test")
        os.environ.setdefault("GPTFLOW_ARTIFACTS_S3_SECRET", "test")
        os.environ.setdefault("GPTFLOW_ARTIFACTS_S3_REGION", "us-east-1")
        os.environ["GPTFLOW_ARTIFACTS_S3_ENDPOINT"] = endpoint
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptflow-bench-s3-")))
        stores = {
            "local": StageStore(tmp / "local" / "stages"),
            "s3": ObjectStageStore(f"s3://{bucket}/{uuid.uuid4().hex[:8]}", cache=tmp / "cache"),
        }
        held: dict[tuple, Any] = {}
        stack.callback(lambda: [lease.release() for lease in held.values()])
        ops = _sides(stores, folders, held)
        seconds: dict[str, dict[str, list[float]]] = {op: {"local": [], "s3": []} for op in ops}
        for r in range(repeats + 1):  # round 0: warm-up, untimed
            order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
            for op, sides in ops.items():
                for side in order:
                    prepare, run = sides[side]
                    prepare()
                    t0 = time.perf_counter()
                    run()
                    if r:
                        seconds[op][side].append(time.perf_counter() - t0)
    rows = []
    for op, per in seconds.items():
        local, s3 = spread(per["local"]), spread(per["s3"])
        rows.append(
            BenchResult(
                name=f"shared_artifacts_{op.replace(' ', '_')}",
                baseline=local["median"],
                optimized=s3["median"],
                ratio=local["median"] / s3["median"],
                unit="s",
                workload=f"{op} of the {len(folders)} stage folders of a smoke run ({mb:.1f} MB)",
                baseline_label="local artifacts folder",
                optimized_label=f"s3:// root ({endpoint})",
                method=f"1 warm-up round, then {repeats} rounds interleaved (alternating "
                "order); median reported, min/max kept",
                spread={"baseline": local, "optimized": s3},
                details={"mb": mb, "overhead_s": s3["median"] - local["median"]},
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=Path, required=True, help="ARTIFACTS/stages of a smoke run")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: a moto server started here)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for row in bench_shared_artifacts(args.stages, endpoint=args.endpoint, repeats=args.repeats):
        print(
            f"{row.name:<32} local {row.baseline:7.3f} s   s3 {row.optimized:7.3f} s   "
            f"overhead {row.details['overhead_s']:+.3f} s ({row.workload})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
