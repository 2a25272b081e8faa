"""Two runs' evaluation rows compared pair by pair (frames in, frames out).

Differences are ``B − A``. Config paths and headline metrics side by side; the spam
classifiers' predictions paired per message, with the flips and McNemar's exact test
(:mod:`gpt.eval.stats`); the judge's scores paired per example, with the deltas, the
paired bootstrap interval of the mean difference and a verdict once there are as many
pairs as the judge gate needs. Which rows belong to a run is the catalog's business
(:mod:`tasks.catalog.compare`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from gpt.eval.stats import BootstrapCI, mcnemar_from_correct, paired_bootstrap_ci

_SPLIT_ORDER = {"train": 0, "val": 1, "validation": 1, "test": 2}

#: Columns of the spam flips and of the McNemar tests.
FLIP_COLUMNS = [
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
TEST_COLUMNS = [
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
#: Columns of the judge's summary per judge model and prompt version.
JUDGE_COLUMNS = [
    "judge_model",
    "prompt_version",
    "n_paired",
    "mean_a",
    "mean_b",
    "mean_diff",
    "ci_low",
    "ci_high",
    "verdict",
]
_JUDGE_KEYS = ["judge_model", "prompt_version", "example_id"]


def split_key(split: str) -> tuple[int, str]:
    """Sort key: train, val, test, then others by name."""
    return (_SPLIT_ORDER.get(split, 9), split)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists and scalars are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


_ABSENT = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)


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


def metrics_side_by_side(
    ma: pd.DataFrame, mb: pd.DataFrame, sections: Sequence[str]
) -> pd.DataFrame:
    """Outer join of two runs' headline metrics (section, metric, value) with
    ``diff = b − a``: sections in the order given, within one the order the runs list
    their metrics."""
    m = ma.merge(mb, on=["section", "metric"], how="outer", suffixes=("_a", "_b"))
    m = m.rename(columns={"value_a": "a", "value_b": "b"})
    m["diff"] = m["b"] - m["a"]
    seen = list(
        dict.fromkeys(
            zip([*ma["section"], *mb["section"]], [*ma["metric"], *mb["metric"]], strict=True)
        )
    )
    rank = {key: i for i, key in enumerate(seen)}
    m["_s"] = m["section"].map({s: i for i, s in enumerate(sections)}).fillna(len(sections))
    m["_m"] = [rank[k] for k in zip(m["section"], m["metric"], strict=True)]
    m = m.sort_values(["_s", "_m"]).drop(columns=["_s", "_m"])
    return m.reset_index(drop=True)[["section", "metric", "a", "b", "diff"]]


def pair_spam(pa: pd.DataFrame, pb: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Examples both runs predicted, joined on (split, example_id) and kept only when the
    label and (where known) the text agree; returns the pairs and how many were dropped."""
    m = pa.merge(pb, on=["split", "example_id"], suffixes=("_a", "_b"))
    same = m["label_a"] == m["label_b"]
    known = m["text_a"].notna() & m["text_b"].notna()
    same &= ~known | (m["text_a"] == m["text_b"])
    return m[same].reset_index(drop=True), int((~same).sum())


def mcnemar_row(
    comparison: str, split: str, first: str, second: str, ok1: pd.Series, ok2: pd.Series
) -> dict[str, Any]:
    """One row of :data:`TEST_COLUMNS`: McNemar's exact test of two classifiers'
    per-example correctness ``ok1`` and ``ok2``."""
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


def spam_flips(
    pa: pd.DataFrame, pb: pd.DataFrame, notes: list[str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(flips, McNemar test rows per split) of two runs' finetuned predictions (split,
    example_id, label, prediction, prob_spam, text); why something is left out goes to
    ``notes``."""
    flips = pd.DataFrame(columns=FLIP_COLUMNS)
    tests: list[dict[str, Any]] = []
    for name, p in (("A", pa), ("B", pb)):
        if p.empty:
            notes.append(f"spam: run {name} has no per-example predictions of the finetuned model")
    if pa.empty or pb.empty:
        return flips, tests
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
        tests.append(mcnemar_row("A vs B (finetuned)", str(split), "A", "B", ok_a[sel], ok_b[sel]))
    f = pairs[pairs["prediction_a"] != pairs["prediction_b"]].copy()
    f["label"] = f["label_a"]
    f["change"] = [
        "fixed" if p == y else "broken"
        for p, y in zip(f["prediction_b"], f["label_a"], strict=True)
    ]
    f["text"] = f["text_b"].where(f["text_b"].notna(), f["text_a"])
    f["_s"] = f["split"].map(lambda s: split_key(s)[0])
    flips = f.sort_values(["_s", "split", "example_id"])[FLIP_COLUMNS].reset_index(drop=True)
    return flips, tests


def judge_pairs(
    sa: pd.DataFrame,
    sb: pd.DataFrame,
    ra: pd.DataFrame,
    rb: pd.DataFrame,
    notes: list[str] | None = None,
) -> pd.DataFrame:
    """Per judge model + prompt version scored in both runs (scores ``sa``, ``sb``:
    judge_model, prompt_version, example_id, score), the examples scored in both with
    the same instruction, input and reference where the responses (``ra``, ``rb``) are
    stored: judge_model, prompt_version, example_id, score_a, score_b, delta and the
    texts."""
    notes = notes if notes is not None else []
    for name, s in (("A", sa), ("B", sb)):
        if s.empty:
            notes.append(f"judge: run {name} has no judge scores")
    keys = _JUDGE_KEYS
    if not sa.empty and not sb.empty:
        only = set(map(tuple, sa[keys[:2]].values)) ^ set(map(tuple, sb[keys[:2]].values))
        for jm, pv in sorted(only):
            notes.append(f"judge: {jm} {pv} scored only one of the runs; not compared")
    m = sa.merge(sb, on=keys, suffixes=("_a", "_b"))
    for r, suffix in ((ra, "_a"), (rb, "_b")):
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


def verdict(ci: BootstrapCI, min_examples: int) -> str:
    """What the interval says, or that fewer than ``min_examples`` pairs say nothing (the
    judge gate's rule)."""
    if ci.n < min_examples:
        return f"not enough data ({ci.n} paired, fewer than {min_examples})"
    if ci.wholly_below_zero:
        return "drop (interval below 0)"
    if ci.wholly_above_zero:
        return "rise (interval above 0)"
    return "no clear change (interval spans 0)"


def judge_summary(
    pairs: pd.DataFrame, cis: dict[tuple[str, str], BootstrapCI], min_examples: int, top: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary per judge model + version, per-example deltas, the ``top`` largest
    regressions per judge) of :func:`judge_pairs` and their :func:`judge_ci`."""
    rows = []
    for (jm, pv), ci in cis.items():
        sel = (pairs["judge_model"] == jm) & (pairs["prompt_version"] == pv)
        rows.append(
            {
                "judge_model": jm,
                "prompt_version": pv,
                "n_paired": ci.n,
                "mean_a": float(pairs.loc[sel, "score_a"].mean()),
                "mean_b": float(pairs.loc[sel, "score_b"].mean()),
                "mean_diff": ci.mean_diff,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "verdict": verdict(ci, min_examples),
            }
        )
    deltas = pairs[[*_JUDGE_KEYS, "score_a", "score_b", "delta"]].reset_index(drop=True)
    worst = (
        pairs[pairs["delta"] < 0]
        .sort_values(["delta", *_JUDGE_KEYS])
        .groupby(["judge_model", "prompt_version"], sort=True)
        .head(top)
        .reset_index(drop=True)
    )
    return pd.DataFrame(rows, columns=JUDGE_COLUMNS), deltas, worst
