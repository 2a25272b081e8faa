"""A child process for the same-bytes test: runs the smoke profile's stages (download to
extract_responses; the judge needs a server) in one artifacts root, each through the
stage runner the pipeline uses, and prints the stages' keys and digests (and the WARNING
lines the project's loggers emitted) as JSON.

    python tests/helpers_dag.py ROOT RUN_ID MIRROR [--kill STAGE:STEP] [--set S.F=V ...]

``--kill STAGE:STEP`` SIGKILLs this process right after STAGE's metrics rows of a step
at or beyond STEP reached its sink (what a killed worker leaves: a ``.partial`` folder
with a resumable checkpoint). ``--set`` overrides settings as ``gptflow run`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("run_id")
    p.add_argument("mirror")
    p.add_argument("--kill", default=None)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)

    from flows.config import build_config
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext, StageRun
    from tasks.stages.runner import run_stage

    if a.kill:
        kill_stage, kill_step = a.kill.split(":")
        sink_of = StageRun.metrics_sink

        def killing_sink(self: StageRun):  # type: ignore[no-untyped-def]
            sink = sink_of(self)

            def wrapped(rows: list[dict]) -> None:
                sink(rows)
                if self.stage == kill_stage and max(r["step"] for r in rows) >= int(kill_step):
                    os.kill(os.getpid(), signal.SIGKILL)

            return wrapped

        StageRun.metrics_sink = killing_sink  # type: ignore[method-assign]

    warnings: list[str] = []

    class Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(f"{record.name}: {record.getMessage()}")

    for name in ("gpt", "tasks", "flows"):  # what the profile's own settings make us say
        logging.getLogger(name).addHandler(Warnings(logging.WARNING))
    cfg = build_config("smoke", a.set)
    ctx = RunContext(
        run_id=a.run_id,
        catalog_settings=CatalogSettings(path=a.root / "catalog.duckdb"),
        artifacts=str(a.root / "artifacts"),
        datasets=str(a.root / "datasets"),
        mirror=a.mirror,
        device="cpu",
        progress=False,
    )
    dl = run_stage(ctx, "download", cfg.download)
    tok = run_stage(ctx, "tokenize", cfg.tokenize, download=dl)
    pre = run_stage(ctx, "pretrain", cfg.pretrain, tokenize=tok)
    base = run_stage(ctx, "load_gpt2", cfg.load_gpt2, tokenize=tok, pretrain=pre)
    spam = run_stage(ctx, "finetune_spam", cfg.finetune_spam, tokenize=tok, load_gpt2=base)
    bl = run_stage(ctx, "baseline_spam", cfg.baseline_spam, tokenize=tok)
    inst = run_stage(ctx, "finetune_instruct", cfg.finetune_instruct, tokenize=tok, load_gpt2=base)
    resp = run_stage(
        ctx, "extract_responses", cfg.extract_responses, tokenize=tok, finetune_instruct=inst
    )
    outs = {"tokenize": tok, "pretrain": pre, "load_gpt2": base, "finetune_spam": spam}
    outs |= {"baseline_spam": bl, "finetune_instruct": inst, "extract_responses": resp}
    print(
        json.dumps(
            {"warnings": warnings}
            | {
                name: {
                    "key": o.key,
                    "digest": o.digest,
                    "producer": o.run_id,
                    "out": o.data,
                }
                for name, o in outs.items()
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
