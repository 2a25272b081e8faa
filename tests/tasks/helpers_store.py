"""A child process for the shared-artifacts tests: runs the download and tokenize stages
of the smoke profile against an artifacts root and prints what happened as JSON.

    python tests/tasks/helpers_store.py MODE RUN_ID ARTIFACTS DB DATASETS MIRROR [BARRIER]

MODE ``race``: wait until the file BARRIER exists, then run tokenize (several children
started together race for its key). MODE ``kill``: run tokenize, but SIGKILL this process
at the moment its commit would publish the manifest (every file already uploaded).
The environment carries the S3 endpoint and the local cache (``GPTFLOW_CACHE``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str]) -> int:
    mode, run_id, artifacts, db, datasets, mirror = argv[:6]
    barrier = Path(argv[6]) if len(argv) > 6 else None

    from flows.config import build_config
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext
    from tasks.stages.runner import run_stage

    seen = _Seen()
    stages_log = logging.getLogger("gptflow.stages")
    stages_log.addHandler(seen)
    stages_log.setLevel(logging.INFO)
    cfg = build_config("smoke", [])
    ctx = RunContext(
        run_id=run_id,
        catalog_settings=CatalogSettings(path=Path(db)),
        artifacts=artifacts,
        datasets=datasets,
        mirror=mirror,
        progress=False,
    )
    dl = run_stage(ctx, "download", cfg.download)
    if mode == "kill":
        from tasks.store.objects import ObjectRoot

        create = ObjectRoot.create

        def killed_before_manifest(self: ObjectRoot, rel: str, data: bytes) -> str | None:
            if rel.endswith("/manifest.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            return create(self, rel, data)

        ObjectRoot.create = killed_before_manifest  # type: ignore[method-assign]
    if barrier is not None:
        while not barrier.exists():
            time.sleep(0.01)
    tok = run_stage(ctx, "tokenize", cfg.tokenize, download=dl)
    print(
        json.dumps(
            {
                "cache_hit": tok.cache_hit,
                "producer": tok.run_id,
                "digest": tok.digest,
                "root": tok.root,
                "waited": any("is being computed by" in m for m in seen.messages),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
