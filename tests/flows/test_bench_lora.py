"""The LoRA benchmark runs both workloads on both sides and reports consistent rows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _paths import REPO


@pytest.mark.slow
def test_lora_step_quick_measures_both_sides_of_both_workloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its four peak-memory children: the first started by the benchmark's own
    launcher, the other three forked from one server that imported torch once (each
    still a process of its own, whose peak RSS is its own: ~1.5 CPU-s less each)."""
    from helpers_fork import ForkServer

    import benchmarks.lora as lora
    from benchmarks.suite import run_benchmark

    launch, calls = lora._child, []
    code = (
        "import json, sys; from benchmarks.lora import lora_step_child; "
        "print(json.dumps(lora_step_child(*json.loads(sys.argv[1]))))"
    )

    def child(workload: str, side: str, spec: dict[str, Any]) -> dict[str, Any]:
        calls.append((workload, side))
        if len(calls) == 1:
            return launch(workload, side, spec)
        name = f"{workload}-{side}"
        children.start(name, ["-c", code, json.dumps([workload, side, spec])])
        rc, out, err = children.finish(name, timeout=300)
        assert rc == 0, err
        return json.loads(out.strip().splitlines()[-1])

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ForkServer(env, tmp_path / "children", preload=("torch",)) as children:
        monkeypatch.setattr(lora, "_child", child)
        r = run_benchmark("lora_step", quick=True)
    assert sorted(calls) == [(w, s) for w in ("instruct", "spam") for s in ("full", "lora")]
    assert r.unit == "s/step" and r.baseline > 0 and r.optimized > 0
    assert r.ratio == pytest.approx(r.baseline / r.optimized)
    for workload in ("spam", "instruct"):
        d = r.details[workload]
        assert d["s_per_step_full"] > 0 and d["s_per_step_lora"] > 0
        assert d["peak_rss_mb_full"] > 50 and d["peak_rss_mb_lora"] > 50
        assert d["spread"]["full"]["n"] == d["spread"]["lora"]["n"] == 3
    inst = r.details["instruct"]
    assert inst["trainable_lora"] < inst["trainable_full"]
    assert r.baseline == inst["s_per_step_full"] and r.met is None  # quick: no verdict
