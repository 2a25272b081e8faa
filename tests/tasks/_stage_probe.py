"""Run stages, each in a process of its own, and report the project modules it loaded.

Used by ``test_fingerprint.py``: the modules a stage really loads must all be in the
import closure its key hashes. Started once; reads one JSON request a line on stdin
(stage, settings, run context fields, the upstream results) and answers each with one
line ``PROBE <json>`` holding the loaded ``gpt``/``tasks``/``flows`` modules and the
stage's result (or ``FAILED <stage>`` with the traceback on stderr).

Each stage runs in a child forked from this interpreter after it imported the heavy
third-party libraries (:data:`SHARED`) and NO project module (checked before every
fork): the child starts without a single ``gpt``/``tasks``/``flows`` module, as a fresh
interpreter would, so what it loads is what the stage (and the runner every stage
shares) needs — without paying torch's and Prefect's import in every stage's process.

Upstream results are given to the stage as plain attribute-access dicts, so that their
stage modules are not imported here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import traceback
from typing import Any

PROJECT = ("gpt", "tasks", "flows")
#: Third-party libraries the stages import, loaded once before the children fork (they
#: load no project module and start no thread; a child imports whatever else it needs
#: itself — duckdb, for one, starts a thread when imported, so each child imports it).
SHARED = ("torch", "numpy", "pandas", "tiktoken", "prefect", "pydantic", "sklearn")


def _project_modules() -> set[str]:
    return {m for m in sys.modules if m.split(".", 1)[0] in PROJECT}


def _single_threaded() -> bool:
    """Forking is only safe with no other thread that could hold a lock."""
    return len(os.listdir("/proc/self/task")) == 1 if os.path.isdir("/proc/self/task") else True


class Fields(dict):
    """A dict whose keys read as attributes (an upstream stage's typed result)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def fields(value: Any) -> Any:
    if isinstance(value, dict):
        return Fields({k: fields(v) for k, v in value.items()})
    if isinstance(value, list):
        return [fields(v) for v in value]
    return value


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Run one stage here; return its result and the project modules now loaded."""
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext, StageOutput
    from tasks.stages.runner import load_spec, run_stage

    spec = load_spec(req["stage"])
    args_type = list(inspect.signature(spec.fn, eval_str=True).parameters.values())[1].annotation
    args = args_type.model_validate_json(json.dumps(req["settings"]))
    ctx = RunContext(
        catalog_settings=CatalogSettings(path=req["context"].pop("db")), **req["context"]
    )
    inputs = {
        name: None if v is None else StageOutput(**{**v, "out": fields(v["out"])})
        for name, v in req["inputs"].items()
    }
    out = run_stage(ctx, req["stage"], args, **inputs)
    result = {
        "stage": out.stage,
        "key": out.key,
        "root": out.root,
        "run_id": out.run_id,
        "digest": out.digest,
        "out": out.data,
    }
    return {"loaded": sorted(_project_modules()), "result": result}


def main() -> None:
    for name in SHARED:
        importlib.import_module(name)
    for line in sys.stdin:
        req = json.loads(line)
        early = sorted(_project_modules())
        if early or not _single_threaded():
            print(f"FAILED {req['stage']}", flush=True)
            print(f"cannot fork a clean child: project modules {early} loaded, "
                  f"{len(os.listdir('/proc/self/task'))} threads", file=sys.stderr, flush=True)  # fmt: skip
            continue
        pid = os.fork()
        if pid == 0:  # the stage's own process
            code = 0
            try:
                print("PROBE " + json.dumps(run(req)), flush=True)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED {req['stage']}", flush=True)
                code = 1
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) not in (0, 1):  # killed: it said nothing
            print(f"FAILED {req['stage']}", flush=True)


if __name__ == "__main__":
    main()
