"""Comparison and regression gates on real smoke runs through a Prefect server.

Three runs share one catalog (module scope, ~2 minutes in all):
1. smoke with ``finetune_spam.pool=last_real`` (so the tiny classifier learns something);
2. the same again: every stage a cache hit, its rows stored under run 1 only;
3. made worse on purpose (spam lr 1e-7 for one epoch; a retrained instruct model whose
   responses the stand-in judge scores ~35 points lower), with ``gates.fail_run=true``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

BASE = ["finetune_spam.pool=last_real"]
WORSE = [
    "finetune_spam.lr=1e-7",
    "finetune_spam.epochs=1",
    "finetune_instruct.lr=1e-5",
    "gates.fail_run=true",
    "gates.judge_min_examples=12",  # smoke judges 12 examples; the default asks for 20
]


class _Judge:
    """Stand-in judge: 60-89 per prompt while ``good``, 35 lower afterwards."""

    good = True

    def reply(self, req: dict) -> str:
        prompt = req["messages"][-1]["content"]
        score = 60 + int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 30
        return json.dumps({"score": score if self.good else score - 35})


@pytest.fixture(scope="module")
def runs(prefect_server, mirror: Path, tmp_path_factory: pytest.TempPathFactory):
    from benchmarks.ollama_stub import OllamaStub
    from flows.pipeline import run_pipeline

    home = tmp_path_factory.mktemp("compare-pipeline")
    judge = _Judge()
    stub = OllamaStub(models=["llama3"], reply=judge.reply)
    stub.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GPTFLOW_DB", str(home / "catalog.duckdb"))
            mp.setenv("GPTFLOW_ARTIFACTS", str(home / "artifacts"))
            mp.setenv("GPTFLOW_DATASETS", str(home / "datasets"))
            mp.setenv("GPTFLOW_MIRROR", str(mirror))
            over = [f"judge.hosts={stub.host}", *BASE]
            r1 = run_pipeline("smoke", over, progress=False)
            r2 = run_pipeline("smoke", over, progress=False)
            judge.good = False
            r3 = run_pipeline("smoke", [*over, *WORSE], progress=False)
    finally:
        stub.stop()
    return {"db": home / "catalog.duckdb", "r1": r1, "r2": r2, "r3": r3}


def test_cached_run_reads_rows_of_its_producer(runs) -> None:
    """Observation 3 on real runs: run 2's spam stages were cache hits; spam_accuracy
    showed NULL for its baselines (and finetuned accuracy) because the rows are run 1's."""
    from tasks.catalog import Catalog

    r1, r2 = runs["r1"], runs["r2"]
    assert r1["status"] == r2["status"] == "completed", (r1, r2)
    assert all(s["cache_hit"] for s in r2["stages"].values()), r2["stages"]
    cat = Catalog(runs["db"])
    q = "SELECT * FROM spam_accuracy WHERE run_id = ? ORDER BY split"
    a1, a2 = cat.query_df(q, [r1["run_id"]]), cat.query_df(q, [r2["run_id"]])
    assert len(a2) == 3 and a2.drop(columns="run_id").notna().all().all()
    assert a1.drop(columns="run_id").equals(a2.drop(columns="run_id"))
    # per-example predictions: stored once, by the run that computed them
    n = cat.query_df(
        "SELECT run_id, model, count(*) AS n FROM predictions GROUP BY ALL ORDER BY ALL"
    )
    by = {(r, m): k for r, m, k in zip(n["run_id"], n["model"], n["n"], strict=True)}
    r1_id = r1["run_id"]
    assert {m: by[(r1_id, m)] for m in ("finetuned", "logreg_bow", "logreg_tfidf", "majority")} == {
        "finetuned": 120,
        "logreg_bow": 120,
        "logreg_tfidf": 120,
        "majority": 120,
    }
    assert not any(r == r2["run_id"] for r, _ in by)
    # the stored predictions reproduce the stored accuracies
    acc = cat.query_df(
        "SELECT split, avg((label = prediction)::INT) AS acc FROM predictions "
        "WHERE run_id = ? AND model = 'finetuned' GROUP BY split",
        [r1_id],
    )
    want = dict(zip(a1["split"], a1["finetuned"], strict=True))
    for split, v in zip(acc["split"], acc["acc"], strict=True):
        assert v == pytest.approx(want[split])


def test_gates_fail_the_worse_run_and_say_by_how_much(runs) -> None:
    from tasks.catalog import Catalog
    from tasks.records.gate_results import GATES_QUERY

    r2, r3 = runs["r2"], runs["r3"]
    cat = Catalog(runs["db"])
    # run 2 = run 1: the drop gates pass with nothing changed
    g2 = cat.query_df(GATES_QUERY, [r2["run_id"]])
    verdicts = dict(zip(g2["gate"], g2["verdict"], strict=True))
    g2 = dict(zip(g2["gate"], g2["passed"], strict=True))
    assert g2["spam_test_max_drop"] == True and g2["judge_mean_must_not_drop"] == True  # noqa: E712
    # 12 judged examples are fewer than the default 20: no verdict on the judge
    assert verdicts["judge_mean_must_not_drop"] == "not enough data"
    # run 3: the flow run failed on the gates, every result stored
    assert r3["status"] == "failed"
    assert "regression gate" in r3["error"] and "spam_test_max_drop" in r3["error"]
    states = {n: s["status"] for n, s in r3["stages"].items() if n != "download"}
    assert set(states.values()) <= {"completed", "cached"}, states
    assert states["finetune_spam"] == states["judge"] == "completed"
    gates = cat.query_df(GATES_QUERY, [r3["run_id"]])
    rows = {g: r for g, r in zip(gates["gate"], gates.to_dict("records"), strict=True)}
    acc = cat.query_df(
        "SELECT run_id, finetuned FROM spam_accuracy WHERE split = 'test' AND run_id IN (?, ?)",
        [r2["run_id"], r3["run_id"]],
    )
    before, after = (
        acc.loc[acc["run_id"] == r, "finetuned"].iloc[0] for r in (r2["run_id"], r3["run_id"])
    )
    spam = rows["spam_test_max_drop"]
    assert spam["passed"] == False and spam["compared_to_run"] == r2["run_id"]  # noqa: E712
    assert spam["value"] == pytest.approx(100 * (before - after)) and spam["value"] > 1.0
    assert spam["threshold"] == 1.0 and "points" in spam["message"]
    judge = rows["judge_mean_must_not_drop"]
    assert judge["passed"] == False and judge["value"] < -20  # noqa: E712
    assert "wholly below 0" in judge["message"]
    # the catalog keeps the run's results: its stages completed, the gates say why it failed
    status = cat.query_df("SELECT status FROM runs WHERE run_id = ?", [r3["run_id"]])
    assert status["status"].iloc[0] == "completed"


def test_cli_compare_on_real_runs(runs, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from tasks.catalog import Catalog

    db = str(runs["db"])
    r1, r2, r3 = (runs[k]["run_id"] for k in ("r1", "r2", "r3"))
    # identical runs (the second all cache hits): no differences anywhere
    assert main(["compare", r1, r2, "--db", db, "--format", "json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["config"] == [] and same["spam_flips"] == []
    assert {m["section"] for m in same["metrics"]} == {
        "pretrain",
        "load_gpt2",
        "finetune_spam",
        "baseline_spam",
        "finetune_instruct",
        "judge",
    }
    assert all(m["diff"] == 0 for m in same["metrics"])
    assert all(d["delta"] == 0 for d in same["judge_deltas"]) and len(same["judge_deltas"]) == 12
    # default: the latest two completed runs (2 and 3)
    assert main(["compare", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"A  {r2}") and f"B  {r3}" in out
    g3 = Catalog(db).query_df("SELECT passed FROM gates WHERE run_id = ?", [r3])["passed"]
    assert f"gates: {int((~g3).sum())} of {len(g3)} failed" in out.splitlines()[1]
    for path in ("finetune_spam.lr", "finetune_spam.epochs", "finetune_instruct.lr"):
        assert path in out
    assert "drop (interval below 0)" in out
    assert "A vs B (finetuned)" in out and "finetuned vs best baseline (B)" in out
    assert main(["compare", r2, r3, "--db", db, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["spam_flips"]) > 0
    (test_row,) = [
        t
        for t in data["spam_tests"]
        if t["comparison"] == "A vs B (finetuned)" and t["split"] == "test"
    ]
    flips_test = [f for f in data["spam_flips"] if f["split"] == "test"]
    assert test_row["only_first_right"] + test_row["only_second_right"] == len(flips_test)
    worst = data["judge_regressions"]
    assert len(worst) == 5 and all(w["delta"] < 0 for w in worst)
    assert all(w["instruction"] and w["response_a"] is not None for w in worst)
