"""Run one stage in a process that starts without any project module and report the
project modules it loaded.

Used by ``test_fingerprint.py``: the modules a stage really loads must all be in the
import closure its key hashes. ``python _stage_probe.py REQUEST.json`` reads the request
(stage, settings, run context fields, the upstream results) and prints one line
``PROBE <json>`` with the loaded ``gpt``/``tasks``/``flows`` modules and the stage's
result. The test forks it from ``helpers_fork.ForkServer`` (third-party libraries
already imported, no project module), or it runs in a fresh interpreter.

Upstream results are given to the stage as plain attribute-access dicts, so that their
stage modules are not imported here: everything loaded is what the stage itself (and the
runner every stage shares) needs.
"""

from __future__ import annotations

import sys

BEFORE = set(sys.modules)

import inspect  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from tasks.catalog import CatalogSettings  # noqa: E402
from tasks.stages.contract import RunContext, StageOutput  # noqa: E402
from tasks.stages.runner import load_spec, run_stage  # noqa: E402

PROJECT = ("gpt", "tasks", "flows")


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


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        req = json.load(f)
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
    loaded = sorted(m for m in set(sys.modules) - BEFORE if m.split(".", 1)[0] in PROJECT)
    result = {
        "stage": out.stage,
        "key": out.key,
        "root": out.root,
        "run_id": out.run_id,
        "digest": out.digest,
        "out": out.data,
    }
    print("PROBE " + json.dumps({"loaded": loaded, "result": result}), flush=True)


if __name__ == "__main__":
    main()
