"""The LoRA benchmark runs both workloads on both sides and reports consistent rows."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_lora_step_quick_measures_both_sides_of_both_workloads() -> None:
    from benchmarks.suite import run_benchmark

    r = run_benchmark("lora_step", quick=True)
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
