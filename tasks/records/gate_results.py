"""Regression gates at the end of a pipeline run: evaluate, store in ``gates``, and fail
the flow run (after everything is stored) when a gate failed and ``gates.fail_run``.

The rules are :mod:`gpt.eval.gates`; the numbers come from the catalog through
:mod:`tasks.catalog.compare`, so cached stages count as the run's own results. Verdicts
are kept under a key of what they read (:func:`gates_key`): a run whose results and
whose previous run's results are those an earlier evaluation saw reuses its verdicts
(a cached rerun reads no rows and imports no pandas for its gates).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from gpt.eval.gates import (
    GATE_SPLIT,
    Evidence,
    GateFailedError,
    GateResult,
    GatesArgs,
    baseline_gate,
    best_baseline,
    failed,
    judge_mean_gate,
    spam_drop_gate,
)
from tasks.catalog import utcnow
from tasks.catalog.lookup import previous_completed_run, stage_outcomes
from tasks.records.runs import RunRecorder
from tasks.run_logger import run_logger
from tasks.store.memo import memo_key, read_memo, write_memo

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog import Catalog
    from tasks.catalog.rundata import RunData

log = logging.getLogger(__name__)

#: Columns of the ``gates`` table, for the report: ``SELECT`` them ``WHERE run_id = ?``.
GATES_QUERY = (
    "SELECT gate, scope, passed, verdict, n, value, threshold, compared_to_run, message "
    "FROM gates WHERE run_id = ? ORDER BY gate, scope"
)


def evaluate_gates(
    cat: Catalog, run_id: str, args: GatesArgs, prev: str | None
) -> list[GateResult]:
    """Every enabled gate's verdict on ``run_id`` against the earlier run ``prev``
    (nothing stored)."""
    from tasks.catalog.rundata import RunData

    results: list[GateResult] = []
    me = RunData(cat, run_id)
    before = RunData(cat, prev) if prev else None
    acc = me.accuracies
    if args.spam_test_max_drop is not None:
        prev_acc = before.accuracies.get("finetuned", {}) if before else {}
        results.append(
            spam_drop_gate(
                acc.get("finetuned", {}).get(GATE_SPLIT),
                prev_acc.get(GATE_SPLIT),
                args.spam_test_max_drop,
                prev,
                evidence=_spam_pairs(before, me) if before else None,
                min_examples=args.spam_test_min_examples,
                min_discordant=args.spam_test_min_discordant,
            )
        )
    if args.judge_mean_must_not_drop:
        results += _judge_gates(me, before, args)
    if args.finetuned_beats_best_baseline:
        baselines = {
            m: a[GATE_SPLIT] for m, a in acc.items() if m != "finetuned" and GATE_SPLIT in a
        }
        results.append(
            baseline_gate(
                acc.get("finetuned", {}).get(GATE_SPLIT),
                baselines,
                evidence=_baseline_pairs(me, best_baseline(baselines)) if baselines else None,
                min_examples=args.baseline_min_examples,
                min_discordant=args.baseline_min_discordant,
            )
        )
    return results


def _evidence(right_a: pd.Series, right_b: pd.Series) -> Evidence:
    """Paired examples and discordant pairs of two classifiers' per-example correctness."""
    return Evidence(len(right_a), int((right_a != right_b).sum()))


def _spam_pairs(before: RunData, me: RunData) -> Evidence:
    """The gate split's messages both runs' finetuned classifiers classified (the same
    message: label and text agree)."""
    from gpt.eval.paired import pair_spam

    pairs, _ = pair_spam(before.predictions(), me.predictions())
    t = pairs[pairs["split"] == GATE_SPLIT]
    return _evidence(t["prediction_a"] == t["label_a"], t["prediction_b"] == t["label_b"])


def _baseline_pairs(me: RunData, best: str) -> Evidence:
    """The gate split's messages both the finetuned classifier and baseline ``best``
    classified."""
    from tasks.catalog.compare import finetuned_and_baseline

    t = finetuned_and_baseline(me, best, GATE_SPLIT)
    return _evidence(t["prediction_f"] == t["label_f"], t["prediction_b"] == t["label_b"])


def _judge_gates(me: RunData, before: RunData | None, args: GatesArgs) -> list[GateResult]:
    from gpt.eval.paired import judge_ci, judge_pairs

    if before is None:
        return [judge_mean_gate(None, "judge", None)]
    prev = before.run_id
    notes: list[str] = []
    pairs = judge_pairs(before.judge_scores, me.judge_scores, before.responses, me.responses, notes)
    cis = judge_ci(
        pairs, n_resamples=args.bootstrap_resamples, confidence=args.confidence, seed=args.seed
    )
    if not cis:
        why = "; ".join(notes) or "no examples scored by the same judge in both runs"
        why = why.replace("run A", f"run {prev}").replace("run B", "this run")
        return [judge_mean_gate(None, "judge", prev, why)]
    return [
        judge_mean_gate(ci, f"{jm} {pv}", prev, min_examples=args.judge_min_examples)
        for (jm, pv), ci in cis.items()
    ]


def gates_key(cat: Catalog, run_id: str, prev: str | None, args: GatesArgs) -> str | None:
    """What the gates of ``run_id`` against ``prev`` read, as a key: both runs' stage
    outcomes (:func:`~tasks.catalog.lookup.stage_outcomes`), the gate settings and the
    code the gates run (derived from what this module imports). None when a finished
    stage's outcome lacks the digest of its results (then only its rows tell)."""
    from tasks.store.fingerprint import code_fingerprint

    outcomes = [stage_outcomes(cat, r) if r else [] for r in (run_id, prev)]
    if any(o[1] == "done" and o[5] is None for side in outcomes for o in side):
        return None
    return memo_key(
        {
            "outcomes": outcomes,
            "args": args.model_dump(mode="json"),
            "code": code_fingerprint(__name__),
        }
    )


def _reused(key: str | None, run_id: str, prev: str | None) -> list[GateResult] | None:
    """The verdicts kept under ``key``, their run ids made ``run_id`` and ``prev``."""
    kept = read_memo("gates", key) if key else None
    if kept is None:
        return None
    ids = {kept["run_id"]: run_id, **({kept["prev"]: prev} if kept["prev"] and prev else {})}

    pattern = re.compile("|".join(re.escape(old) for old in ids))

    def swap(value: Any) -> Any:  # every id at once: the new ids may be old ones
        return pattern.sub(lambda m: ids[m.group(0)], value) if isinstance(value, str) else value

    log.info("gates: same inputs as run %s; its verdicts are reused", kept["run_id"])
    return [GateResult(**{k: swap(v) for k, v in r.items()}) for r in kept["results"]]


def run_gates(
    cat: Catalog, run_id: str, args: GatesArgs, *, recorder: RunRecorder | None = None
) -> list[GateResult]:
    """Evaluate and store the gates of a finished run; never raises for a failed gate
    (see :func:`raise_for_gates`). When the gates are not enforced (``fail_run`` false)
    an error while evaluating them is logged, not raised."""
    logger = run_logger(__name__)
    if not args.enabled:
        return []
    try:
        prev = previous_completed_run(cat, run_id, passed_only=args.compare_to == "last_passed")
        key = gates_key(cat, run_id, prev, args)
        results = _reused(key, run_id, prev)
        if results is None:
            results = evaluate_gates(cat, run_id, args, prev)
            if key is not None:
                kept = {"run_id": run_id, "prev": prev, "results": [r.to_dict() for r in results]}
                write_memo("gates", key, kept)
        now = utcnow()
        rows = [{"run_id": run_id, **r.to_dict(), "evaluated_at": now} for r in results]
        if recorder is not None:  # kept in the run's record too: a rebuilt catalog has them
            recorder.record_run_rows(run_id, "gates", rows)
        else:
            cat.replace_rows("gates", rows, where={"run_id": run_id})
    except Exception as exc:
        if args.fail_run:
            raise
        logger.warning("could not evaluate the regression gates: %s", exc)
        return []
    for r in results:
        state = {True: "passed", False: "FAILED", None: "not evaluated"}[r.passed]
        level = logging.WARNING if r.passed is False else logging.INFO
        logger.log(level, "gate %s [%s] %s: %s", r.gate, r.scope, state, r.message)
    return results


def raise_for_gates(run_id: str, results: list[GateResult], args: GatesArgs) -> None:
    """Raise :class:`~gpt.eval.gates.GateFailedError` naming every failed gate when
    ``args.fail_run`` is set (call it after everything else is stored)."""
    bad = failed(results)
    if bad and args.enabled and args.fail_run:
        raise GateFailedError(run_id, bad)
