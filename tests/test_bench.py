"""``gptflow bench --quick`` smoke test: the cheap benchmarks run and their rows reach
the catalog's ``benchmarks`` table and the JSON file (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

# ratio = optimized / baseline for throughputs, baseline / optimized for times and memory
THROUGHPUT = {"generate", "generate_batched", "judge", "train_step"}
LOWER_IS_BETTER = {"spam_finetune", "windowing", "pipeline_rerun"}


def test_bench_quick_writes_rows(
    mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from flows.cli import main
    from gpt.paths import artifacts_dir
    from tasks.catalog import Catalog

    names = ["generate", "generate_batched", "spam_finetune"]
    out_json = tmp_path / "bench.json"
    rc = main(
        ["bench", "--quick", "--only", *names, "--mirror", str(mirror), "--json", str(out_json)]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in names:
        assert name in printed

    df = Catalog().query_df("SELECT * FROM benchmarks ORDER BY name")
    assert sorted(df["name"]) == sorted(names)
    for row in df.to_dict("records"):
        assert row["baseline"] > 0 and row["optimized"] > 0 and row["ratio"] > 0
        if row["name"] in THROUGHPUT:
            expected = row["optimized"] / row["baseline"]
        else:
            assert row["name"] in LOWER_IS_BETTER
            expected = row["baseline"] / row["optimized"]
        assert math.isclose(row["ratio"], expected, rel_tol=1e-9)
        hw = json.loads(row["hardware"]) if isinstance(row["hardware"], str) else row["hardware"]
        assert hw["cores"] >= 1 and hw["torch"] and hw["device"] in ("cpu", "cuda")
        details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
        assert details["quick"] is True
        assert row["time"] is not None

    spam = df[df["name"] == "spam_finetune"].iloc[0]
    spam_details = (
        json.loads(spam["details"]) if isinstance(spam["details"], str) else spam["details"]
    )
    # the frozen-prefix cache must not change the training: same losses, same metrics
    assert spam_details["max_step_loss_diff"] <= 1e-4
    assert spam_details["final_metrics_equal"] is True

    files = sorted((artifacts_dir() / "bench").glob("*.json"))
    assert len(files) == 1
    for path in (files[0], out_json):
        payload = json.loads(path.read_text())
        assert payload["quick"] is True
        assert [r["name"] for r in payload["results"]] == names
        for r in payload["results"]:
            assert r["baseline"] > 0 and r["optimized"] > 0 and r["ratio"] > 0


def test_bench_rejects_unknown_name(capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--only", "no_such_benchmark"])
    assert "invalid choice" in capsys.readouterr().err
