"""Run-vs-run comparison from the catalog (``gptflow compare``, the regression gates).

Each section reads a run's rows through the runs that produced them
(:class:`tasks.catalog.rundata.RunData`), so a cached run compares like the run that
computed them, and pairs them with :mod:`gpt.eval.paired`; a run lacking a section gets
a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from gpt.errors import CatalogError
from gpt.eval.gates import DEFAULT_MIN_EXAMPLES, best_baseline
from gpt.eval.paired import (
    TEST_COLUMNS,
    config_diff,
    judge_ci,
    judge_pairs,
    judge_summary,
    mcnemar_row,
    metrics_side_by_side,
    spam_flips,
    split_key,
)
from gpt.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from tasks.catalog.lookup import latest_completed_runs, previous_completed_run, resolve_run
from tasks.catalog.rundata import RunData

if TYPE_CHECKING:
    from tasks.catalog import Catalog

#: Section order of the headline metrics.
SECTIONS = ("pretrain", "load_gpt2", "finetune_spam", "baseline_spam", "finetune_instruct", "judge")


@dataclass
class Comparison:
    """Everything ``gptflow compare`` shows, as tables."""

    run_a: dict[str, Any]
    """``runs`` row of A (``config`` parsed; only ``run_id`` when A has no row)."""
    run_b: dict[str, Any]
    """``runs`` row of B."""
    config: pd.DataFrame
    """path, a, b: config values that differ (JSON text)."""
    metrics: pd.DataFrame
    """section, metric, a, b, diff (= b − a)."""
    spam_flips: pd.DataFrame
    """split, example_id, label, prediction_a, prediction_b, prob_spam_a, prob_spam_b,
    change ('fixed' / 'broken' for B), text."""
    spam_tests: pd.DataFrame
    """McNemar's exact tests: comparison, split, first, second, n, acc_first, acc_second,
    only_first_right, only_second_right, p_value."""
    judge: pd.DataFrame
    """Per judge model + prompt version: n_paired, mean_a, mean_b, mean_diff, ci_low,
    ci_high, verdict."""
    judge_deltas: pd.DataFrame
    """judge_model, prompt_version, example_id, score_a, score_b, delta."""
    judge_regressions: pd.DataFrame
    """The largest drops: judge_model, prompt_version, example_id, score_a, score_b,
    delta, instruction, input, reference, response_a, response_b."""
    notes: list[str] = field(default_factory=list)
    """Why a section is empty or partial."""
    settings: dict[str, Any] = field(default_factory=dict)
    """n_resamples, confidence, seed, top, min_examples."""


# --------------------------------------------------------------------------- runs


def pick_runs(cat: Catalog, a: str | None, b: str | None) -> tuple[str, str]:
    """(A, B): the two runs named, or with one name that run as B and the completed run
    started before it as A, or with none the latest two completed runs (older = A)."""
    if a is not None and b is not None:
        return resolve_run(cat, a), resolve_run(cat, b)
    if a is not None:
        run_b = resolve_run(cat, a)
        prev = previous_completed_run(cat, run_b)
        if prev is None:
            raise CatalogError(
                f"run {run_b} has no earlier completed run of its profile to compare with; "
                "name both runs: `gptflow compare RUN_A RUN_B`"
            )
        return prev, run_b
    latest = latest_completed_runs(cat, 2)
    if len(latest) < 2:
        raise CatalogError(
            f"the catalog {cat.location} holds {len(latest)} completed run(s); comparing needs "
            "two: run the pipeline again or name two runs (`gptflow compare RUN_A RUN_B`)"
        )
    return latest[1], latest[0]


def finetuned_and_baseline(run: RunData, baseline: str, split: str) -> pd.DataFrame:
    """The messages of ``split`` that both the finetuned classifier and ``baseline``
    classified in ``run`` (their columns suffixed ``_f`` and ``_b``)."""
    ft, bl = run.predictions("finetuned"), run.predictions(baseline)
    return ft[ft["split"] == split].merge(
        bl[bl["split"] == split], on=["split", "example_id"], suffixes=("_f", "_b")
    )


def finetuned_vs_best_baseline(run: RunData, label: str) -> list[dict[str, Any]]:
    """McNemar's exact test, per split, of the best baseline (first) vs the finetuned
    classifier (second) of one run; best = highest accuracy on that split."""
    acc = run.accuracies
    rows: list[dict[str, Any]] = []
    for split in sorted(run.predictions("finetuned")["split"].unique(), key=split_key):
        cands = {m: a[split] for m, a in acc.items() if m != "finetuned" and split in a}
        if not cands:
            continue
        best = best_baseline(cands)
        m = finetuned_and_baseline(run, best, split)
        if m.empty:
            continue
        rows.append(
            mcnemar_row(
                f"finetuned vs best baseline ({label})",
                str(split),
                best,
                "finetuned",
                m["prediction_b"] == m["label_b"],
                m["prediction_f"] == m["label_f"],
            )
        )
    return rows


def spam_comparison(
    run_a: RunData, run_b: RunData, notes: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(flips, McNemar tests) of the finetuned classifiers of two runs, and of each run's
    finetuned classifier against its best baseline."""
    flips, tests = spam_flips(run_a.predictions(), run_b.predictions(), notes)
    for name, run in (("A", run_a), ("B", run_b)):
        tests += finetuned_vs_best_baseline(run, name)
    return flips, pd.DataFrame(tests, columns=TEST_COLUMNS)


def compare_runs(
    cat: Catalog,
    run_a: str,
    run_b: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    top: int = 5,
    min_examples: int | None = None,
) -> Comparison:
    """Compare two runs (ids as stored; see :func:`pick_runs` for references), reading
    the catalog on one connection. A judge verdict needs ``min_examples`` paired examples
    (default: B's ``gates.judge_min_examples``, else the gates' default)."""
    with cat.held(read_only=True):
        notes: list[str] = []
        da, db = RunData(cat, run_a), RunData(cat, run_b)
        info_a, info_b = da.info, db.info
        which = [n for n, i in (("A", info_a), ("B", info_b)) if i["config"] is None]
        if which:
            notes.append(f"config: run {' and '.join(which)} recorded no config")
        cfg = config_diff(None, None) if which else config_diff(info_a["config"], info_b["config"])
        if min_examples is None:
            gates = (info_b["config"] or {}).get("gates") or {}
            min_examples = int(gates.get("judge_min_examples", DEFAULT_MIN_EXAMPLES))
        metrics = metrics_side_by_side(da.headline(), db.headline(), SECTIONS)
        flips, tests = spam_comparison(da, db, notes)
        pairs = judge_pairs(da.judge_scores, db.judge_scores, da.responses, db.responses, notes)
        cis = judge_ci(pairs, n_resamples=n_resamples, confidence=confidence, seed=seed)
        judge, deltas, worst = judge_summary(pairs, cis, min_examples, top)
        return Comparison(
            run_a=info_a,
            run_b=info_b,
            config=cfg,
            metrics=metrics,
            spam_flips=flips,
            spam_tests=tests,
            judge=judge,
            judge_deltas=deltas,
            judge_regressions=worst,
            notes=notes,
            settings={
                "n_resamples": n_resamples,
                "confidence": confidence,
                "seed": seed,
                "top": top,
                "min_examples": min_examples,
            },
        )
