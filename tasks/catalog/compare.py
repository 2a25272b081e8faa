"""Run-vs-run comparison from the catalog (``gptflow compare``, the regression gates).

Every section reads each run's rows through the stage that produced them
(:mod:`tasks.catalog.lookup`), so a run whose stages were cache hits compares like the
run that computed them, and a run holding only some sections (e.g. judge-only runs made
by ``gptflow judge --responses FILE --run NAME``) yields the sections it has and a note
for the others.

Differences are always ``B − A`` (A = the older / reference run).

- config: every dotted path whose value differs.
- metrics: headline numbers of every stage side by side (pretrain and instruct final
  losses, load_gpt2 perplexity, spam accuracies per split and baselines, judge
  mean / median / n per judge model + prompt version).
- spam: the finetuned classifier's examples whose prediction flipped; McNemar's exact
  test A vs B per split, and finetuned vs the best baseline (highest accuracy on that
  split, ties by name) within each run.
- judge (per judge model + prompt version; repeated judgments of an example are
  averaged first): per-example score deltas, the paired bootstrap interval of the mean
  difference with a verdict — given as many paired examples as the judge gate needs
  (:mod:`gpt.eval.gates`), else "not enough data" — and the largest regressions with the
  instruction, the reference and both responses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from gpt.errors import CatalogError
from gpt.eval.gates import DEFAULT_MIN_EXAMPLES
from gpt.eval.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapCI,
    mcnemar_from_correct,
    paired_bootstrap_ci,
)
from tasks.catalog.lookup import latest_completed_runs, previous_completed_run, resolve_run
from tasks.catalog.rundata import RunData, split_key

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


# --------------------------------------------------------------------------- config


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists and scalars are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> pd.DataFrame:
    """path, a, b for every dotted path whose value differs (values as JSON text; a path
    missing on one side shows ``(absent)``)."""
    fa, fb = flatten(a or {}), flatten(b or {})
    rows = []
    for path in sorted(set(fa) | set(fb)):
        va, vb = fa.get(path, _ABSENT), fb.get(path, _ABSENT)
        if va != vb:
            rows.append({"path": path, "a": _show(va), "b": _show(vb)})
    return pd.DataFrame(rows, columns=["path", "a", "b"])


_ABSENT = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)


# --------------------------------------------------------------------------- metrics


def metrics_side_by_side(ma: pd.DataFrame, mb: pd.DataFrame) -> pd.DataFrame:
    """Outer join of two runs' headline metrics with ``diff = b − a``."""
    m = ma.merge(mb, on=["section", "metric"], how="outer", suffixes=("_a", "_b"))
    m = m.rename(columns={"value_a": "a", "value_b": "b"})
    m["diff"] = m["b"] - m["a"]
    # sections in DAG order; within one, the order the runs list their metrics
    seen = list(
        dict.fromkeys(
            zip([*ma["section"], *mb["section"]], [*ma["metric"], *mb["metric"]], strict=True)
        )
    )
    rank = {key: i for i, key in enumerate(seen)}
    m["_s"] = m["section"].map({s: i for i, s in enumerate(SECTIONS)}).fillna(len(SECTIONS))
    m["_m"] = [rank[k] for k in zip(m["section"], m["metric"], strict=True)]
    m = m.sort_values(["_s", "_m"]).drop(columns=["_s", "_m"])
    return m.reset_index(drop=True)[["section", "metric", "a", "b", "diff"]]


# --------------------------------------------------------------------------- spam


def pair_spam(pa: pd.DataFrame, pb: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Examples both runs predicted, joined on (split, example_id) and kept only when the
    label and (where known) the text agree; returns the pairs and how many were dropped."""
    m = pa.merge(pb, on=["split", "example_id"], suffixes=("_a", "_b"))
    same = m["label_a"] == m["label_b"]
    known = m["text_a"].notna() & m["text_b"].notna()
    same &= ~known | (m["text_a"] == m["text_b"])
    return m[same].reset_index(drop=True), int((~same).sum())


def _mcnemar_row(
    comparison: str, split: str, first: str, second: str, ok1: pd.Series, ok2: pd.Series
) -> dict[str, Any]:
    r = mcnemar_from_correct(ok1.tolist(), ok2.tolist())
    n = len(ok1)
    return {
        "comparison": comparison,
        "split": split,
        "first": first,
        "second": second,
        "n": n,
        "acc_first": float(ok1.mean()) if n else None,
        "acc_second": float(ok2.mean()) if n else None,
        "only_first_right": r.b,
        "only_second_right": r.c,
        "p_value": r.p_value,
    }


def finetuned_vs_best_baseline(run: RunData, label: str) -> list[dict[str, Any]]:
    """McNemar's exact test, per split, of the best baseline (first) vs the finetuned
    classifier (second) of one run; best = highest accuracy on that split."""
    acc = run.accuracies
    ft = run.predictions("finetuned")
    rows: list[dict[str, Any]] = []
    if ft.empty:
        return rows
    for split in sorted(ft["split"].unique(), key=split_key):
        cands = {m: a[split] for m, a in acc.items() if m != "finetuned" and split in a}
        if not cands:
            continue
        best = max(sorted(cands), key=lambda m: cands[m])
        bl = run.predictions(best)
        m = ft[ft["split"] == split].merge(
            bl[bl["split"] == split], on=["split", "example_id"], suffixes=("_f", "_b")
        )
        if m.empty:
            continue
        rows.append(
            _mcnemar_row(
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
    """(flips, McNemar tests) of the finetuned classifiers of two runs."""
    pa, pb = run_a.predictions(), run_b.predictions()
    tests: list[dict[str, Any]] = []
    flips = pd.DataFrame(
        columns=[
            "split",
            "example_id",
            "label",
            "prediction_a",
            "prediction_b",
            "prob_spam_a",
            "prob_spam_b",
            "change",
            "text",
        ]
    )
    for name, p in (("A", pa), ("B", pb)):
        if p.empty:
            notes.append(f"spam: run {name} has no per-example predictions of the finetuned model")
    if not pa.empty and not pb.empty:
        pairs, dropped = pair_spam(pa, pb)
        if dropped:
            notes.append(
                f"spam: {dropped} example(s) differ between the runs' splits (label or text) "
                "and are left out of the paired comparison"
            )
        ok_a = pairs["prediction_a"] == pairs["label_a"]
        ok_b = pairs["prediction_b"] == pairs["label_b"]
        for split in sorted(pairs["split"].unique(), key=split_key):
            sel = pairs["split"] == split
            tests.append(
                _mcnemar_row("A vs B (finetuned)", str(split), "A", "B", ok_a[sel], ok_b[sel])
            )
        f = pairs[pairs["prediction_a"] != pairs["prediction_b"]].copy()
        f["label"] = f["label_a"]
        f["change"] = [
            "fixed" if p == y else "broken"
            for p, y in zip(f["prediction_b"], f["label_a"], strict=True)
        ]
        f["text"] = f["text_b"].where(f["text_b"].notna(), f["text_a"])
        f["_s"] = f["split"].map(lambda s: split_key(s)[0])
        flips = f.sort_values(["_s", "split", "example_id"])[list(flips.columns)].reset_index(
            drop=True
        )
    for name, run in (("A", run_a), ("B", run_b)):
        tests += finetuned_vs_best_baseline(run, name)
    cols = [
        "comparison",
        "split",
        "first",
        "second",
        "n",
        "acc_first",
        "acc_second",
        "only_first_right",
        "only_second_right",
        "p_value",
    ]
    return flips, pd.DataFrame(tests, columns=cols)


# --------------------------------------------------------------------------- judge


def judge_pairs(run_a: RunData, run_b: RunData, notes: list[str] | None = None) -> pd.DataFrame:
    """Per judge model + prompt version scored in both runs, the examples scored in both
    (same instruction, input and reference where the responses are stored): judge_model,
    prompt_version, example_id, score_a, score_b, delta and the texts."""
    notes = notes if notes is not None else []
    sa, sb = run_a.judge_scores, run_b.judge_scores
    for name, s in (("A", sa), ("B", sb)):
        if s.empty:
            notes.append(f"judge: run {name} has no judge scores")
    keys = ["judge_model", "prompt_version", "example_id"]
    if not sa.empty and not sb.empty:
        only = set(map(tuple, sa[keys[:2]].values)) ^ set(map(tuple, sb[keys[:2]].values))
        for jm, pv in sorted(only):
            notes.append(f"judge: {jm} {pv} scored only one of the runs; not compared")
    m = sa.merge(sb, on=keys, suffixes=("_a", "_b"))
    for run, suffix in ((run_a, "_a"), (run_b, "_b")):
        r = run.responses
        r = r.rename(columns={c: f"{c}{suffix}" for c in r.columns if c != "example_id"})
        m = m.merge(r, on="example_id", how="left")
    same = pd.Series(True, index=m.index)
    for col in ("instruction", "input", "output"):
        a, b = m[f"{col}_a"], m[f"{col}_b"]
        same &= a.isna() | b.isna() | (a == b)
    if (~same).any():
        notes.append(
            f"judge: {int((~same).sum())} example(s) hold different instructions in the two "
            "runs and are left out of the paired comparison"
        )
    m = m[same].copy()
    m["delta"] = m["score_b"] - m["score_a"]
    m["instruction"] = m["instruction_b"].where(m["instruction_b"].notna(), m["instruction_a"])
    m["input"] = m["input_b"].where(m["input_b"].notna(), m["input_a"])
    m["reference"] = m["output_b"].where(m["output_b"].notna(), m["output_a"])
    cols = [
        *keys,
        "score_a",
        "score_b",
        "delta",
        "instruction",
        "input",
        "reference",
        "response_a",
        "response_b",
    ]
    return m[cols].sort_values(keys).reset_index(drop=True)


def judge_ci(
    pairs: pd.DataFrame, *, n_resamples: int, confidence: float, seed: int
) -> dict[tuple[str, str], BootstrapCI]:
    """The paired bootstrap interval of the mean difference per judge model + version."""
    out = {}
    for (jm, pv), g in pairs.groupby(["judge_model", "prompt_version"], sort=True):
        out[(str(jm), str(pv))] = paired_bootstrap_ci(
            g["score_a"].to_numpy(float),
            g["score_b"].to_numpy(float),
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )
    return out


def _verdict(ci: BootstrapCI, min_examples: int) -> str:
    if ci.n < min_examples:  # the judge gate's rule: too few pairs for any verdict
        return f"not enough data ({ci.n} paired, fewer than {min_examples})"
    if ci.wholly_below_zero:
        return "drop (interval below 0)"
    if ci.wholly_above_zero:
        return "rise (interval above 0)"
    return "no clear change (interval spans 0)"


def judge_comparison(
    run_a: RunData,
    run_b: RunData,
    notes: list[str],
    *,
    n_resamples: int,
    confidence: float,
    seed: int,
    top: int,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, per-example deltas, largest regressions) of the judge's scores; a
    verdict needs ``min_examples`` paired examples."""
    pairs = judge_pairs(run_a, run_b, notes)
    cis = judge_ci(pairs, n_resamples=n_resamples, confidence=confidence, seed=seed)
    summary = pd.DataFrame(
        [
            {
                "judge_model": jm,
                "prompt_version": pv,
                "n_paired": ci.n,
                "mean_a": float(pairs.loc[_sel(pairs, jm, pv), "score_a"].mean()),
                "mean_b": float(pairs.loc[_sel(pairs, jm, pv), "score_b"].mean()),
                "mean_diff": ci.mean_diff,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "verdict": _verdict(ci, min_examples),
            }
            for (jm, pv), ci in cis.items()
        ],
        columns=[
            "judge_model",
            "prompt_version",
            "n_paired",
            "mean_a",
            "mean_b",
            "mean_diff",
            "ci_low",
            "ci_high",
            "verdict",
        ],
    )
    deltas = pairs[["judge_model", "prompt_version", "example_id", "score_a", "score_b", "delta"]]
    worst = (
        pairs[pairs["delta"] < 0]
        .sort_values(["delta", "judge_model", "prompt_version", "example_id"])
        .groupby(["judge_model", "prompt_version"], sort=True)
        .head(top)
        .reset_index(drop=True)
    )
    return summary, deltas, worst


def _sel(df: pd.DataFrame, jm: str, pv: str) -> pd.Series:
    return (df["judge_model"] == jm) & (df["prompt_version"] == pv)


# --------------------------------------------------------------------------- all


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
        if info_a["config"] is None or info_b["config"] is None:
            which = [n for n, i in (("A", info_a), ("B", info_b)) if i["config"] is None]
            notes.append(f"config: run {' and '.join(which)} recorded no config")
            cfg = config_diff(None, None)
        else:
            cfg = config_diff(info_a["config"], info_b["config"])
        if min_examples is None:
            gates = (info_b["config"] or {}).get("gates") or {}
            min_examples = int(gates.get("judge_min_examples", DEFAULT_MIN_EXAMPLES))
        metrics = metrics_side_by_side(da.headline(), db.headline())
        flips, tests = spam_comparison(da, db, notes)
        judge, deltas, worst = judge_comparison(
            da,
            db,
            notes,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
            top=top,
            min_examples=min_examples,
        )
        return Comparison(
            run_a=info_a,
            run_b=info_b,
            config=cfg,
            metrics=metrics,
            spam_flips=flips,
            spam_tests=tests,
            judge=judge,
            judge_deltas=deltas.reset_index(drop=True),
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


__all__ = [
    "Comparison",
    "compare_runs",
    "config_diff",
    "flatten",
    "judge_ci",
    "judge_pairs",
    "pick_runs",
    "spam_comparison",
]
