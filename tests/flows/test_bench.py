"""``gptflow bench --quick`` smoke tests: the benchmarks run, every row states its method
and the spread of its repeats consistently with its figures, and the rows reach the
catalog, the JSON file and the performance-table renderer (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from _ci import require_module

# ratio = optimized / baseline for throughputs, baseline / optimized for times and memory
THROUGHPUT = {
    "generate",
    "generate_batched",
    "generate_compile",
    "judge",
    "train_step",
    "train_step_compile",
    "vs_book_train_step",
    "vs_book_generate",
    "vs_book_generate_int8",
    "vs_book_generate_trained",
}
LOWER_IS_BETTER = {
    "spam_finetune",
    "windowing",
    "pipeline_rerun",
    "vs_book_spam_epoch",
    "extract_responses",
}


def check_row(r: dict[str, Any]) -> None:
    """Structure and internal consistency of one result row."""
    assert r["baseline"] > 0 and r["optimized"] > 0 and r["ratio"] > 0
    if r["name"] in THROUGHPUT:
        expected = r["optimized"] / r["baseline"]
    else:
        assert r["name"] in LOWER_IS_BETTER
        expected = r["baseline"] / r["optimized"]
    assert math.isclose(r["ratio"], expected, rel_tol=1e-9)
    assert r["workload"] and r["baseline_label"] and r["optimized_label"]
    assert "interleaved" in r["method"] and "median" in r["method"]
    for side in ("baseline", "optimized"):
        s = r["spread"][side]
        assert s["n"] >= 2, f"{r['name']} {side}: several repeats"
        assert s["min"] <= s["median"] <= s["max"]
        assert math.isclose(s["median"], r[side], rel_tol=1e-9)  # the figure is the median


def test_bench_quick_writes_consistent_rows(
    mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks.render import render
    from flows.cli import main
    from gpt.paths import artifacts_dir
    from tasks.catalog import Catalog

    names = ["train_step", "generate", "spam_finetune"]
    out_json = tmp_path / "bench.json"
    rc = main(
        ["bench", "--quick", "--only", *names, "--mirror", str(mirror), "--json", str(out_json)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in names:
        assert name in printed
    assert "of the nominal peak" in printed and "plain-matmul" in printed

    df = Catalog().query_df("SELECT * FROM benchmarks ORDER BY name")
    assert sorted(df["name"]) == sorted(names)
    for row in df.to_dict("records"):
        hw = json.loads(row["hardware"]) if isinstance(row["hardware"], str) else row["hardware"]
        assert hw["cores"] >= 1 and hw["torch"] and hw["device"] in ("cpu", "cuda")
        assert hw["cpu_isa"] in ("avx512", "avx2+fma", "avx", "sse")
        details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
        assert details["quick"] is True and details["method"] and details["spread"]
        assert row["time"] is not None

    files = sorted((artifacts_dir() / "bench").glob("*.json"))
    assert len(files) == 1
    for path in (files[0], out_json):
        payload = json.loads(path.read_text())
        assert payload["quick"] is True and payload["command"].startswith("gptflow bench")
        assert [r["name"] for r in payload["results"]] == names
        for r in payload["results"]:
            check_row(r)
    rows = {r["name"]: r for r in payload["results"]}

    # both MFU figures, each what it says: achieved / nominal peak, achieved / measured matmul
    d = rows["train_step"]["details"]
    assert d["nominal_peak_gflops"] > 0 and "FLOPs/cycle" in d["nominal_peak_formula"]
    assert math.isclose(d["mfu_vs_nominal_peak"], d["achieved_gflops"] / d["nominal_peak_gflops"])
    assert math.isclose(
        d["mfu_vs_measured_matmul"], d["achieved_gflops"] / d["matmul_gflops_measured"]
    )
    # the frozen-prefix cache must not change the training: same losses, same metrics
    spam = rows["spam_finetune"]["details"]
    assert spam["max_step_loss_diff"] <= 1e-4 and spam["final_metrics_equal"] is True
    assert rows["generate"]["details"]["identical_tokens"] == 40

    text = render(payload, "bench.json")
    assert "| benchmark | workload |" in text and "No GPU figures" in text
    assert all(f"| {n} |" in text for n in names) and "nominal peak" in text


def test_bench_vs_book_quick_prints_the_three_ratios(
    mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    require_module("llms_from_scratch", 'pip install --no-deps "llms-from-scratch==1.0.19"')
    from benchmarks.render import render
    from flows.cli import main

    out_json = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--quick",
            "--vs-book",
            "--only",
            "judge",
            "--mirror",
            str(mirror),
            "--json",
            str(out_json),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    block = printed.split("side by side with the book's package")[1]
    targets = {"train_step": "1.3x", "generate": "12x", "generate_int8": "20x",
               "spam_epoch": "5x"}  # fmt: skip
    for name, target in targets.items():
        assert f"vs_book_{name} " in block and f">= {target}" in block
    assert block.count(": met") + block.count(": not met") == 4
    # no trained checkpoint in this isolated environment: skipped with the fix
    assert "vs_book_generate_trained: skipped" in printed and "GPTFLOW_BENCH_CHECKPOINT" in printed
    payload = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert set(rows) == {"judge", *(f"vs_book_{n}" for n in targets)}
    for r in rows.values():
        check_row(r)
    # the same function on both sides, so the ratios compare like with like
    assert rows["vs_book_train_step"]["details"]["initial_max_logit_diff"] < 1e-4
    for name in ("vs_book_generate", "vs_book_generate_int8"):
        details = rows[name]["details"]
        assert details["identical_tokens"] is True  # drafted == one token per pass (== book)
        assert details["drafted_equals_one_token_decoding"] is True
        assert details["plain_tokens_per_s"] > 0 and details["passes"] > 0
    assert rows["vs_book_spam_epoch"]["details"]["first_epoch_max_step_loss_diff"] < 1e-4
    text = render(payload, "x.json")
    assert "Side by side with the book's own package" in text
    assert "| spam_epoch |" in text


def test_decode_benchmarks_on_a_checkpoint(
    mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trained-checkpoint rows (here a tiny tied model whose text loops) compare like
    with like: the same responses before and after, the same tokens drafted or not."""
    require_module("llms_from_scratch", "a dev dependency: pip install --no-deps llms-from-scratch")
    import torch

    from benchmarks.decode import bench_extract_responses, bench_vs_book_generate_trained
    from gpt.architecture import GPTConfig
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT

    torch.manual_seed(4)
    cfg = GPTConfig(context_length=256, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    ckpt = save_checkpoint(tmp_path / "lm", GPT(cfg).eval(), tokenizer_dir=mirror / "gpt2")
    monkeypatch.setenv("GPTFLOW_BENCH_CHECKPOINT", str(ckpt))
    ext = bench_extract_responses(str(mirror), quick=True).to_dict()
    check_row(ext)
    d = ext["details"]
    assert d["prompts"] == 12 and d["responses_identical"] == 12 and d["acceptance_rate"] > 0
    book = bench_vs_book_generate_trained(str(mirror), quick=True).to_dict()
    check_row(book)
    assert book["details"]["identical_tokens"] is True and book["details"]["ratio_int8"] > 0


@pytest.mark.slow
def test_windowing_measures_both_sides(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's eight child processes: the first one started by its own launcher,
    the other seven forked from one server that imported torch, NumPy and tiktoken once
    (each still a process of its own, measuring its own memory growth; ~1.5 CPU-s less
    each)."""
    import os

    from helpers_fork import ForkServer

    import benchmarks.recipes as recipes

    launch, calls = recipes._run_child, []
    code = (
        "import json, sys; from benchmarks.recipes import windows_child; "
        "print(json.dumps(windows_child(*json.loads(sys.argv[1]))))"
    )

    def run_child(args: list[Any]) -> dict[str, Any]:
        calls.append(args)
        if len(calls) == 1:
            return launch(args)
        name = f"child-{len(calls)}"
        children.start(name, ["-c", code, json.dumps(args)])
        rc, out, err = children.finish(name, timeout=300)
        assert rc == 0, err
        return json.loads(out.strip().splitlines()[-1])

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with ForkServer(env, tmp_path / "children", preload=("torch", "numpy", "tiktoken")) as children:
        monkeypatch.setattr(recipes, "_run_child", run_child)
        r = recipes.bench_windowing(quick=True, tokenizer_dir=tokenizer_dir).to_dict()
    # a warm-up and 2 repeats per side, then the 2 scaling sizes
    assert sorted(a[0] for a in calls) == ["dataset"] * 5 + ["materialised"] * 3
    check_row(r)
    d = r["details"]
    # the materialised baseline really ran (no estimate), in its own processes
    assert len(d["build_s_baseline"]) == len(d["build_s_optimized"]) == 2
    assert r["baseline"] > r["optimized"]
    assert d["materialised_estimate_mb_at_largest"] > 0  # the large-corpus figure is named so


def test_selection_and_registry() -> None:
    from benchmarks.names import ALL, SUITE, VS_BOOK
    from benchmarks.suite import BENCHMARKS
    from flows.commands.bench import selected

    assert tuple(BENCHMARKS) == ALL and set(SUITE) | set(VS_BOOK) == set(ALL)
    assert selected(None, False) == list(SUITE)
    assert selected(None, True) == list(ALL)
    assert selected(["judge"], True) == ["judge", *VS_BOOK]
    assert selected(["generate", "train_step"], False) == ["train_step", "generate"]


def test_bench_rejects_unknown_name(capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--only", "no_such_benchmark"])
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- peaks, render


def test_nominal_peak_formula() -> None:
    from benchmarks.peak import cpu_peak, cpu_vector_isa, gpu_peak

    assert cpu_vector_isa({"avx512f", "fma", "avx2", "avx"}) == "avx512"
    assert cpu_vector_isa({"avx2", "fma", "avx"}) == "avx2+fma"
    assert cpu_vector_isa({"avx"}) == "avx" and cpu_vector_isa(set()) == "sse"
    p = cpu_peak(threads=1)
    assert p["cores"] == 1 and p["flops_per_cycle"] in (64, 32, 16, 8)
    if p["clock_ghz"] is not None:
        assert math.isclose(p["gflops"], p["clock_ghz"] * p["flops_per_cycle"])
    h200 = gpu_peak("NVIDIA H200", "bf16")
    assert h200["gflops"] == 989_400.0 and h200["matched"] == "H200"
    assert gpu_peak("NVIDIA H100 PCIe", "bf16")["matched"] == "H100 PCIe"
    assert gpu_peak("Some Future GPU", "bf16")["gflops"] is None


def test_render_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.render import main

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([str(bad)]) == 1
    assert "not a `gptflow bench` results file" in capsys.readouterr().err
    row = {
        "name": "judge",
        "baseline": 4.0,
        "optimized": 30.0,
        "ratio": 7.5,
        "unit": "examples/s",
        "target": ">= 5x",
        "met": True,
        "workload": "40 examples",
        "baseline_label": "concurrency 1",
        "optimized_label": "concurrency 8",
        "method": "interleaved",
        "details": {},
        "spread": {
            "baseline": {"min": 3.9, "median": 4.0, "max": 4.1, "n": 3},
            "optimized": {"min": 29.0, "median": 30.0, "max": 31.0, "n": 3},
        },
    }
    good = tmp_path / "r.json"
    good.write_text(
        json.dumps(
            {
                "time": "2026-01-02T03:04:05",
                "quick": False,
                "hardware": {"cpu": "X", "device": "cpu"},
                "results": [row],
            }
        )
    )
    out = tmp_path / "table.md"
    assert main([str(good), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Measured 2026-01-02 03:04 UTC" in text
    assert "| judge | 40 examples | concurrency 1: 4 ex/s (3.9–4.1, n=3) |" in text
    assert "7.5×" in text and "| yes |" in text


def test_decode_benchmarks_read_the_cpu_profile_of_the_source_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTFLOW_HOME moves the data folders, not the code: the decoding rows still find the
    cpu profile's settings (they looked under GPTFLOW_HOME and failed)."""
    import tomllib

    from benchmarks.decode import _cpu_profile

    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    _, extract = _cpu_profile()
    here = Path(__file__).resolve().parents[2] / "flows" / "profiles" / "cpu.toml"
    want = tomllib.loads(here.read_text(encoding="utf-8")).get("extract_responses", {})
    assert want, "the cpu profile sets extract_responses"
    for field, value in want.items():
        assert getattr(extract, field) == value, field


def test_results_name_the_machine() -> None:
    """A results file says what it was measured on: CPU model, its vector flags, cores,
    clock and clock source, besides torch and the device."""
    from benchmarks.core import hardware
    from benchmarks.peak import cpuinfo

    hw = hardware()
    assert hw["cpu"] and hw["cores"] >= 1 and hw["cpu_clock_ghz"] > 0
    flags = set(cpuinfo().get("flags", "").split())
    assert set(hw["cpu_flags"]) <= flags
    assert ("avx2" in flags) == ("avx2" in hw["cpu_flags"])
    source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    if source.exists():
        assert hw["clock_source"] == source.read_text().strip()
    else:
        assert hw["clock_source"] is None
