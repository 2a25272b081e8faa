"""Run-vs-run comparison and regression gates on a small catalog written by hand, so
every number below can be checked on paper; plus two judge-only runs made through
``gptflow judge`` against the Ollama stand-in.

The hand-made catalog: runs r1 and r2 (profile smoke) and r0 (profile cpu, older).
r2 recomputed finetune_spam and the responses but took tokenize, pretrain and
baseline_spam from r1's cache, so those rows are stored under r1 only.

spam test split: 10 messages, 0-4 spam, 5-9 ham.
- r1 finetuned: wrong on 9 only (accuracy 0.9); r2 finetuned: wrong on 5, 6, 7 (0.7).
  Flips: 5, 6, 7 broken, 9 fixed. McNemar A vs B: b = 3, c = 1, p = 2·(1+4)/16 = 0.625.
- baselines (r1): logreg_bow wrong on 7, 8, 9 (0.7); majority says ham (0.5).
  r1: best = logreg_bow; only baseline right 0, only finetuned right 2 (7, 8): p = 0.5.
  r2: only baseline right 2 (5, 6), only finetuned right 2 (8, 9): p = 1.
judge llama3/v1 scores (repeats averaged): r1 {0: (80+90)/2, 1: 70, 2: 60, 3: failed},
r2 {0: 40, 1: 65, 2: 30, 3: 50} → pairs 0, 1, 2 with deltas −45, −5, −30.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers_catalog import record_metrics

from tasks.catalog import Catalog

T0 = datetime(2026, 1, 1, 3, 0, 0)
CFG1 = {"profile": "smoke", "finetune_spam": {"lr": 0.001, "epochs": 2}, "judge": {"model": "x"}}
CFG2 = {"profile": "smoke", "finetune_spam": {"lr": 1e-7, "epochs": 2}, "judge": {"model": "x"}}
LABELS = ["spam"] * 5 + ["ham"] * 5


def _preds(run: str, stage: str, model: str, wrong: set[int]) -> list[dict]:
    flip = {"spam": "ham", "ham": "spam"}
    return [
        {
            "run_id": run,
            "stage": stage,
            "model": model,
            "split": "test",
            "example_id": i,
            "label": y,
            "prediction": flip[y] if i in wrong else y,
            "prob_spam": 0.9 if (flip[y] if i in wrong else y) == "spam" else 0.1,
        }
        for i, y in enumerate(LABELS)
    ]


def _stage(run: str, stage: str, producer: str | None, **extra) -> dict:
    outputs = {"producer_run_id": producer, **extra} if producer else extra
    return {"run_id": run, "stage": stage, "status": "completed", "outputs": outputs}


def build_catalog(path: Path) -> Catalog:
    cat = Catalog(path)
    cat.migrate()
    with cat.connect() as con:  # judge repeats (another change adds the column)
        con.execute('ALTER TABLE judgments ADD COLUMN IF NOT EXISTS "repeat" INTEGER')
    cat.insert_rows(
        "runs",
        [
            {"run_id": "r0", "profile": "cpu", "status": "completed", "started_at": T0},
            {
                "run_id": "r1",
                "profile": "smoke",
                "status": "completed",
                "started_at": T0 + timedelta(hours=1),
                "config": CFG1,
            },
            {
                "run_id": "r2",
                "profile": "smoke",
                "status": "completed",
                "started_at": T0 + timedelta(hours=2),
                "config": CFG2,
            },
        ],
    )
    stages = [
        _stage("r1", s, "r1")
        for s in ("tokenize", "pretrain", "finetune_spam", "baseline_spam", "extract_responses")
    ]
    stages.append(_stage("r1", "judge", None, responses_run_id="r1"))
    stages += [_stage("r2", s, "r1") for s in ("tokenize", "pretrain", "baseline_spam")]
    stages += [_stage("r2", s, "r2") for s in ("finetune_spam", "extract_responses")]
    stages.append(_stage("r2", "judge", None, responses_run_id="r2"))
    cat.insert_rows("stages", stages)
    cat.insert_rows(
        "spam_examples",
        [
            {"run_id": "r1", "split": "test", "idx": i, "label": y, "text": f"message {i}"}
            for i, y in enumerate(LABELS)
        ],
    )
    cat.insert_rows(
        "predictions",
        _preds("r1", "finetune_spam", "finetuned", {9})
        + _preds("r2", "finetune_spam", "finetuned", {5, 6, 7})
        + _preds("r1", "baseline_spam", "logreg_bow", {7, 8, 9})
        + _preds("r1", "baseline_spam", "majority", {0, 1, 2, 3, 4}),
    )
    record_metrics(
        cat,
        "r1",
        "finetune_spam",
        [{"step": 10, "split": "test", "name": "final_accuracy", "value": 0.9}],
    )
    record_metrics(
        cat,
        "r2",
        "finetune_spam",
        [{"step": 10, "split": "test", "name": "final_accuracy", "value": 0.7}],
    )
    record_metrics(
        cat,
        "r1",
        "pretrain",
        [
            {"step": 10, "split": "train", "name": "loss", "value": 5.0},
            {"step": 20, "split": "train", "name": "loss", "value": 4.0},
        ],
    )
    cat.insert_rows(
        "baselines",
        [
            {"run_id": "r1", "model": "logreg_bow", "split": "test", "accuracy": 0.7},
            {"run_id": "r1", "model": "majority", "split": "test", "accuracy": 0.5},
        ],
    )
    for run in ("r1", "r2"):
        cat.insert_rows(
            "responses",
            [
                {
                    "run_id": run,
                    "example_id": i,
                    "instruction": f"Rewrite sentence {i}.",
                    "input": "" if i else "The cat sat.",
                    "output": f"reference {i}",
                    "response": f"{run} answer {i}",
                }
                for i in range(4)
            ],
        )

    def j(run, ex, score, repeat=0, model="llama3"):
        return {
            "run_id": run,
            "example_id": ex,
            "judge_model": model,
            "prompt_version": "v1",
            "score": score,
            "repeat": repeat,
            "error": None if score is not None else "timeout",
        }

    cat.insert_rows(
        "judgments",
        [
            j("r1", 0, 80),
            j("r1", 0, 90, repeat=1),
            j("r1", 1, 70),
            j("r1", 2, 60),
            j("r1", 3, None),
            j("r2", 0, 40),
            j("r2", 1, 65),
            j("r2", 2, 30),
            j("r2", 3, 50),
            j("r2", 0, 77, model="judge-b"),
        ],
    )
    return cat


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cat = build_catalog(tmp_path_factory.mktemp("compare") / "catalog.duckdb")
    cat.publish()  # the file copied below is the published one
    return cat.path


@pytest.fixture
def cat(template: Path, tmp_path: Path) -> Catalog:
    """A fresh copy of the hand-made catalog (tests may write to it)."""
    path = tmp_path / "catalog.duckdb"
    shutil.copyfile(template, path)
    return Catalog(path)


def test_spam_accuracy_reads_cached_stages_from_their_producer(tmp_path: Path) -> None:
    """Observation 3: r2's baseline_spam stage was a cache hit, so its baselines are r1's
    rows; the view showed NULL for them. (Only tables older than this change.)"""
    cat = Catalog(tmp_path / "obs3.duckdb")
    cat.insert_rows(
        "stages",
        [
            _stage("r1", "finetune_spam", "r1"),
            _stage("r1", "baseline_spam", "r1"),
            _stage("r2", "finetune_spam", "r2"),
            _stage("r2", "baseline_spam", "r1"),  # cache hit: computed by r1
            _stage("r3", "finetune_spam", "r1"),  # both cache hits
            _stage("r3", "baseline_spam", "r1"),
        ],
    )
    for run, acc in (("r1", 0.9), ("r2", 0.7)):
        record_metrics(
            cat,
            run,
            "finetune_spam",
            [{"step": 1, "split": "test", "name": "final_accuracy", "value": acc}],
        )
    cat.insert_rows(
        "baselines",
        [
            {"run_id": "r1", "model": "logreg_bow", "split": "test", "accuracy": 0.7},
            {"run_id": "r1", "model": "majority", "split": "test", "accuracy": 0.5},
            {"run_id": "r0", "model": "majority", "split": "test", "accuracy": 0.4},  # no stages
        ],
    )
    df = cat.query_df("SELECT * FROM spam_accuracy ORDER BY run_id")
    got = {
        r["run_id"]: (r["finetuned"], r["logreg_bow"], r["majority"]) for r in df.to_dict("records")
    }
    assert got["r1"] == (0.9, 0.7, 0.5)
    assert got["r2"] == (0.7, 0.7, 0.5)  # its own finetune, r1's baselines
    assert got["r3"] == (0.9, 0.7, 0.5)  # everything from r1
    assert got["r0"][2] == 0.4 and len(df) == 4  # a run without stage rows reads its own


def test_stage_producers_view(cat: Catalog) -> None:
    prod = cat.query_df(
        "SELECT stage, producer_run_id FROM stage_producers WHERE run_id = 'r2' ORDER BY stage"
    )
    assert dict(zip(prod["stage"], prod["producer_run_id"], strict=True)) == {
        "baseline_spam": "r1",
        "extract_responses": "r2",
        "finetune_spam": "r2",
        "judge": "r2",
        "pretrain": "r1",
        "tokenize": "r1",
    }


def test_compare_sections_by_hand(cat: Catalog) -> None:
    from tasks.catalog.compare import compare_runs

    comp = compare_runs(cat, "r1", "r2", n_resamples=2000, seed=0, top=2, min_examples=3)
    # config: only the changed path
    assert comp.config.to_dict("records") == [
        {"path": "finetune_spam.lr", "a": "0.001", "b": "1e-07"}
    ]
    # metrics, through the producers (r2's pretrain and baselines are r1's)
    m = {(r["section"], r["metric"]): r for r in comp.metrics.to_dict("records")}
    assert m[("pretrain", "final train loss")]["b"] == 4.0
    assert m[("pretrain", "final train loss")]["diff"] == 0
    assert m[("finetune_spam", "finetuned test accuracy")]["diff"] == pytest.approx(-0.2)
    assert m[("baseline_spam", "logreg_bow test accuracy")]["b"] == 0.7
    assert m[("judge", "llama3 v1 mean")]["a"] == pytest.approx(215 / 3)  # (85 + 70 + 60) / 3
    assert m[("judge", "llama3 v1 n")]["a"] == 3 and m[("judge", "llama3 v1 n")]["b"] == 4
    assert m[("judge", "judge-b v1 mean")]["b"] == 77 and m[("judge", "judge-b v1 mean")]["a"] != 0
    # spam flips and McNemar
    flips = comp.spam_flips
    assert flips["example_id"].tolist() == [5, 6, 7, 9]
    assert flips["change"].tolist() == ["broken", "broken", "broken", "fixed"]
    assert flips["text"].tolist() == ["message 5", "message 6", "message 7", "message 9"]
    tests = {r["comparison"]: r for r in comp.spam_tests.to_dict("records")}
    ab = tests["A vs B (finetuned)"]
    assert (ab["n"], ab["only_first_right"], ab["only_second_right"]) == (10, 3, 1)
    assert ab["p_value"] == pytest.approx(0.625)
    assert (ab["acc_first"], ab["acc_second"]) == (0.9, 0.7)
    fa = tests["finetuned vs best baseline (A)"]
    assert (fa["first"], fa["only_first_right"], fa["only_second_right"]) == ("logreg_bow", 0, 2)
    assert fa["p_value"] == pytest.approx(0.5)
    fb = tests["finetuned vs best baseline (B)"]
    assert (fb["only_first_right"], fb["only_second_right"], fb["p_value"]) == (2, 2, 1.0)
    # judge: repeats averaged, only examples scored in both, per model + version
    assert comp.judge_deltas["example_id"].tolist() == [0, 1, 2]
    assert comp.judge_deltas["delta"].tolist() == [-45.0, -5.0, -30.0]
    (row,) = comp.judge.to_dict("records")
    assert (row["judge_model"], row["n_paired"]) == ("llama3", 3)
    assert row["mean_diff"] == pytest.approx(-80 / 3)
    assert row["ci_high"] < 0 and row["verdict"].startswith("drop")
    worst = comp.judge_regressions.to_dict("records")
    assert [w["example_id"] for w in worst] == [0, 2]  # top 2, largest drop first
    assert worst[0]["instruction"] == "Rewrite sentence 0." and worst[0]["input"] == "The cat sat."
    assert worst[0]["reference"] == "reference 0"
    assert (worst[0]["response_a"], worst[0]["response_b"]) == ("r1 answer 0", "r2 answer 0")
    assert any("judge-b v1 scored only one" in n for n in comp.notes)


def test_compare_judge_verdict_needs_the_gates_minimum(
    cat: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    """A judge verdict rests on as many paired examples as the judge gate needs
    (``gates.judge_min_examples``): the 3 pairs here, interval wholly below 0, are "not
    enough data" under the gates' default, a drop once the minimum is 3 — given, or
    recorded in run B's gates settings."""
    from flows.cli import main
    from gpt.eval.gates import DEFAULT_MIN_EXAMPLES
    from tasks.catalog.compare import compare_runs

    def verdict(**kw: Any) -> str:
        comp = compare_runs(cat, "r1", "r2", n_resamples=2000, seed=0, **kw)
        (row,) = comp.judge.to_dict("records")
        assert row["ci_high"] < 0 and row["n_paired"] == 3
        return row["verdict"]

    assert verdict() == f"not enough data (3 paired, fewer than {DEFAULT_MIN_EXAMPLES})"
    assert verdict(min_examples=4) == "not enough data (3 paired, fewer than 4)"
    assert verdict(min_examples=3) == "drop (interval below 0)"
    assert main(["compare", "r1", "r2", "--db", str(cat.path)]) == 0
    out = capsys.readouterr().out
    assert f"a verdict needs {DEFAULT_MIN_EXAMPLES} paired examples" in out
    assert "not enough data (3 paired" in out and "drop (interval" not in out
    argv = ["compare", "r1", "r2", "--db", str(cat.path), "--format", "json"]
    assert main([*argv, "--min-examples", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["min_examples"] == 3 and data["judge"][0]["verdict"].startswith("drop")
    with cat.connect() as con:  # run B's own gates setting is the default
        con.execute(
            "UPDATE runs SET config = ? WHERE run_id = 'r2'",
            [json.dumps({**CFG2, "gates": {"judge_min_examples": 3}})],
        )
    assert verdict() == "drop (interval below 0)"


def test_compare_bootstrap_is_the_library_interval(cat: Catalog) -> None:
    from gpt.eval.stats import paired_bootstrap_ci
    from tasks.catalog.compare import compare_runs

    comp = compare_runs(cat, "r1", "r2", n_resamples=3000, seed=4)
    want = paired_bootstrap_ci([85, 70, 60], [40, 65, 30], n_resamples=3000, seed=4)
    row = comp.judge.iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (want.low, want.high)


def test_pick_runs_defaults_prefixes_and_errors(cat: Catalog, tmp_path: Path) -> None:
    from gpt.errors import CatalogError
    from tasks.catalog.compare import pick_runs

    assert pick_runs(cat, None, None) == ("r1", "r2")  # latest two completed, older first
    assert pick_runs(cat, "r2", None) == ("r1", "r2")  # the run before it, same profile
    assert pick_runs(cat, "r0", "r2") == ("r0", "r2")
    with pytest.raises(CatalogError, match="no earlier completed run"):
        pick_runs(cat, "r0", None)  # the only cpu run
    with pytest.raises(CatalogError, match="no run 'nope'"):
        pick_runs(cat, "nope", "r1")
    with pytest.raises(CatalogError, match="ambiguous"):
        pick_runs(cat, "r", "r1")
    empty = Catalog(tmp_path / "empty.duckdb")
    empty.migrate()
    with pytest.raises(CatalogError, match="holds 0 completed run"):
        pick_runs(empty, None, None)


def test_cli_compare_formats(cat: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    db = str(cat.path)
    assert main(["compare", "--db", db]) == 0
    out = capsys.readouterr().out
    for title in (
        "== config: 1 difference(s)",
        "== metrics (diff = B − A)",
        "== spam: finetuned predictions that flipped (4;",
        "== spam: McNemar's exact test",
        "== judge: mean score B − A, paired bootstrap 95% interval (10000 resamples, seed 0)",
        "== judge: per-example score deltas",
        "== judge: largest regressions (top 5 per judge)",
    ):
        assert title in out, title
    assert "- llama3 v1 example 0: 85 → 40 (-45)" in out
    assert "response B:  r2 answer 0" in out
    assert main(["compare", "r1", "r2", "--db", db, "--format", "json", "--resamples", "500"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["a"]["run_id"], data["b"]["run_id"]) == ("r1", "r2")
    assert data["settings"]["n_resamples"] == 500
    assert len(data["spam_flips"]) == 4 and len(data["judge_deltas"]) == 3
    assert data["judge"][0]["mean_diff"] == pytest.approx(-80 / 3)
    assert main(["compare", "r1", "r2", "--db", db, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "# spam_tests\ncomparison,split,first,second,n," in out
    assert main(["compare", "r1", "zzz", "--db", db]) == 1
    assert "no run 'zzz'" in capsys.readouterr().err


# --------------------------------------------------------------------------- gates


#: Minimums this small catalog meets (10 test messages; r2 vs r1 and r2's finetuned vs
#: logreg_bow: 4 discordant pairs each; 3 judge pairs), so the gates give verdicts.
SMALL = {
    "spam_test_min_examples": 10,
    "spam_test_min_discordant": 4,
    "baseline_min_examples": 10,
    "baseline_min_discordant": 4,
    "judge_min_examples": 3,
}


def test_gates_by_hand(cat: Catalog) -> None:
    from gpt.eval.gates import GateFailedError, GatesArgs
    from tasks.records.gate_results import GATES_QUERY, raise_for_gates, run_gates

    args = GatesArgs(bootstrap_resamples=2000, **SMALL)
    res = {r.gate: r for r in run_gates(cat, "r2", args)}
    drop = res["spam_test_max_drop"]
    assert drop.passed is False and drop.value == pytest.approx(20.0)
    assert drop.threshold == 1.0 and drop.compared_to_run == "r1"
    judge = res["judge_mean_must_not_drop"]
    assert judge.passed is False and judge.scope == "llama3 v1"
    assert judge.value == pytest.approx(-80 / 3)
    base = res["finetuned_beats_best_baseline"]  # 0.7 vs logreg_bow 0.7: not higher
    assert base.passed is False and base.value == pytest.approx(0.0)
    assert "logreg_bow" in base.message
    stored = cat.query_df(GATES_QUERY, ["r2"])
    assert len(stored) == 3 and not stored["passed"].any()
    # not enforced: nothing raised; enforced: one error naming each failed gate
    raise_for_gates("r2", list(res.values()), args)
    with pytest.raises(GateFailedError, match=r"spam_test_max_drop \[test\].*20\.0 points"):
        raise_for_gates("r2", list(res.values()), args.replace(fail_run=True))

    # r1: no earlier smoke run (r0 is another profile) -> drop gates not evaluated
    r1 = {r.gate: r for r in run_gates(cat, "r1", args)}
    assert r1["spam_test_max_drop"].passed is None
    assert "no earlier completed run" in r1["spam_test_max_drop"].message
    assert r1["judge_mean_must_not_drop"].passed is None
    assert r1["finetuned_beats_best_baseline"].passed is True
    assert r1["finetuned_beats_best_baseline"].value == pytest.approx(20.0)
    # r1 vs logreg_bow: 2 discordant pairs (7, 8), below the 4 asked for
    assert r1["finetuned_beats_best_baseline"].verdict == "not enough data"
    # switched off
    assert run_gates(cat, "r2", args.replace(enabled=False)) == []
    off = run_gates(
        cat,
        "r2",
        args.replace(
            spam_test_max_drop=None,
            judge_mean_must_not_drop=False,
            finetuned_beats_best_baseline=False,
        ),
    )
    assert off == [] and cat.query_df(GATES_QUERY, ["r2"]).empty


def test_gates_are_reused_when_both_runs_hold_the_same_results(
    cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r3 and r4 are cached reruns of r2 (every stage's outcome the same): r4's gates
    against r3 read what r3's against r2 read, so r3's verdicts are reused with the run
    ids swapped, without reading a row; a run whose results differ is evaluated."""
    from gpt.eval.gates import GatesArgs
    from tasks.records import gate_results

    monkeypatch.setenv("GPTFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    args = GatesArgs(bootstrap_resamples=500, **SMALL)
    with cat.connect() as con:  # every stage's results get a digest, as real runs record
        con.execute(
            "UPDATE stages SET outputs = json_merge_patch(outputs, json_object('digest', "
            "'d-' || stage || '-' || coalesce(json_extract_string(outputs, "
            "'$.producer_run_id'), run_id)))"
        )
        for i, run in ((3, "r3"), (4, "r4"), (5, "r5")):
            con.execute(
                "INSERT INTO runs (run_id, profile, status, started_at) "
                "VALUES (?, 'smoke', 'completed', ?)",
                [run, T0 + timedelta(hours=i)],
            )
            con.execute(
                "INSERT INTO stages (run_id, stage, status, outputs) "
                "SELECT ?, stage, 'cached', outputs FROM stages WHERE run_id = 'r2'",
                [run],
            )
        con.execute(  # r5 recomputed its finetune
            'UPDATE stages SET outputs = json_merge_patch(outputs, \'{"digest": "new"}\') '
            "WHERE run_id = 'r5' AND stage = 'finetune_spam'"
        )
    evaluated: list[str] = []
    real = gate_results.evaluate_gates
    monkeypatch.setattr(
        gate_results,
        "evaluate_gates",
        lambda c, run_id, a, prev: evaluated.append(run_id) or real(c, run_id, a, prev),
    )
    r3 = gate_results.run_gates(cat, "r3", args)
    r4 = gate_results.run_gates(cat, "r4", args)
    assert evaluated == ["r3"]
    assert {r.compared_to_run for r in r3} == {"r2", None}  # the baseline gate: none
    assert [r.compared_to_run for r in r4] == ["r3" if r.compared_to_run else None for r in r3]
    swapped = [m.message.replace("r3", "r4").replace("r2", "r3") for m in r3]
    assert [r.message for r in r4] == swapped and "r2" not in " ".join(swapped)
    assert [(r.gate, r.passed, r.value, r.n) for r in r4] == [
        (r.gate, r.passed, r.value, r.n) for r in r3
    ]
    stored = cat.query_rows("SELECT compared_to_run FROM gates WHERE run_id = 'r4'")
    assert {r["compared_to_run"] for r in stored} == {"r3", None}
    gate_results.run_gates(cat, "r5", args)  # other results than r4's: evaluated
    assert evaluated == ["r3", "r5"]


def test_gates_compare_to_last_passed(cat: Catalog) -> None:
    from gpt.eval.gates import GatesArgs
    from tasks.catalog.lookup import previous_completed_run
    from tasks.records.gate_results import run_gates

    args = GatesArgs(bootstrap_resamples=500, **SMALL)
    run_gates(cat, "r2", args)  # r2 fails its gates
    cat.insert_rows(
        "runs",
        [
            {
                "run_id": "r3",
                "profile": "smoke",
                "status": "completed",
                "started_at": T0 + timedelta(hours=3),
            }
        ],
    )
    assert previous_completed_run(cat, "r3") == "r2"
    assert previous_completed_run(cat, "r3", passed_only=True) == "r1"
    res = run_gates(cat, "r3", args.replace(compare_to="last_passed"))
    assert {r.compared_to_run for r in res if r.gate == "spam_test_max_drop"} == {"r1"}


def test_gates_without_enough_data_pass_and_say_so(cat: Catalog) -> None:
    """The default minimums (20 paired examples, 6 discordant pairs) are more than this
    catalog holds: each gate that would fail reports "not enough data" and passes; the
    gates table and the report say so, and an enforced run does not fail."""
    from flows.report.blocks import to_markdown
    from flows.report.build import build_report
    from gpt.eval.gates import GatesArgs
    from tasks.records.gate_results import GATES_QUERY, raise_for_gates, run_gates

    args = GatesArgs(bootstrap_resamples=500, fail_run=True)
    res = {r.gate: r for r in run_gates(cat, "r2", args)}
    assert {r.verdict for r in res.values()} == {"not enough data"}
    assert all(r.passed is True for r in res.values())
    drop = res["spam_test_max_drop"]
    assert drop.n == 10 and drop.value == pytest.approx(20.0)  # the number is kept
    assert "10 paired example(s), fewer than gates.spam_test_min_examples = 20" in drop.message
    judge = res["judge_mean_must_not_drop"]
    assert judge.n == 3 and "gates.judge_min_examples = 20" in judge.message
    assert "wholly below 0" in judge.message  # what it would have said
    raise_for_gates("r2", list(res.values()), args)  # nothing failed
    stored = cat.query_df(GATES_QUERY, ["r2"])
    assert set(stored["verdict"]) == {"not enough data"} and stored["passed"].all()
    assert sorted(stored["n"]) == [3, 10, 10]
    body = to_markdown(build_report(cat, "r2"))
    assert "3 of 3 gates passed. 3 of them on too few examples" in body
    assert body.count("| not enough data |") == 3
    # enough examples but too few discordant pairs (4 < 6)
    fewer = args.replace(spam_test_min_examples=10, judge_min_examples=3)
    res = {r.gate: r for r in run_gates(cat, "r2", fewer)}
    assert res["judge_mean_must_not_drop"].verdict == "failed"
    assert res["spam_test_max_drop"].verdict == "not enough data"
    assert "4 discordant pair(s)" in res["spam_test_max_drop"].message


def test_gates_config_section() -> None:
    from flows.config import build_config
    from gpt.errors import ConfigError

    cfg = build_config("smoke", ["gates.fail_run=true", "gates.spam_test_max_drop=2.5"])
    assert cfg.gates.fail_run and cfg.gates.spam_test_max_drop == 2.5
    assert build_config("smoke").gates.fail_run is False
    with pytest.raises(ConfigError, match="spam_test_max_drop"):
        build_config("smoke", ["gates.spam_test_max_drop=-1"])
    with pytest.raises(ConfigError, match="gates"):
        build_config("smoke", ["gates.unknown=1"])
    cfg = build_config("smoke", ["gates.judge_min_examples=50", "gates.spam_test_min_discordant=0"])
    assert (cfg.gates.judge_min_examples, cfg.gates.spam_test_min_discordant) == (50, 0)
    for bad in ("gates.judge_min_examples=0", "gates.baseline_min_discordant=true"):
        with pytest.raises(ConfigError, match=bad.partition("=")[0]):
            build_config("smoke", [bad])


# --------------------------------------------------------------------------- judge-only


def test_compare_two_judge_only_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs made by `gptflow judge --responses FILE --run NAME` hold only responses
    and judgments: compare shows the judge section and says why the others are empty."""
    from benchmarks.ollama_stub import OllamaStub
    from flows.cli import main

    good = [90, 80, 85, 10, 88, 40]  # run A's score of response i; run B: 20 lower, >= 0
    records = [
        {"instruction": f"Name a color {i}.", "input": "", "output": "Blue.",
         "model_response": f"[r{i}] a color"}
        for i in range(len(good))
    ]  # fmt: skip
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records))
    db = str(tmp_path / "judge.duckdb")

    def reply_for(delta: int):
        def reply(req: dict) -> str:
            i = int(re.search(r"\[r(\d)\]", req["messages"][-1]["content"]).group(1))
            return json.dumps({"score": max(0, good[i] + delta)})

        return reply

    for run, delta in (("judge-a", 0), ("judge-b", -20)):
        stub = OllamaStub(models=["llama3"], reply=reply_for(delta))
        stub.start()
        try:
            argv = ["judge", "--responses", str(path), "--run", run, "--host", stub.host]
            assert main([*argv, "--db", db, "--no-progress"]) == 0
        finally:
            stub.stop()
    capsys.readouterr()
    assert main(["compare", "judge-a", "judge-b", "--db", db, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["delta"] for r in data["judge_deltas"]] == [-20, -20, -20, -10, -20, -20]
    (summary,) = data["judge"]
    assert summary["n_paired"] == 6 and summary["mean_diff"] == pytest.approx(-110 / 6)
    assert summary["ci_high"] < 0
    assert data["spam_flips"] == [] and data["spam_tests"] == []
    # judge-only runs record their judge settings; only the stand-ins' addresses differ
    assert [d["path"] for d in data["config"]] == ["judge.hosts"]
    assert [m["section"] for m in data["metrics"]] == ["judge"] * 3
    assert any("spam: run A has no per-example predictions" in n for n in data["notes"])
    assert main(["compare", "judge-a", "judge-b", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "A  judge-a  profile judge, completed" in out
    assert "instruction: Name a color 0." in out
