"""Regression gates: rules a scheduled run's results must pass.

The settings (:class:`GatesArgs`) are the pipeline config's ``gates`` section. Each
check below is a pure function of numbers the catalog holds and returns a
:class:`GateResult`: ``passed`` is True or False, or None when the gate could not be
evaluated (no earlier run to compare with, a stage that produced nothing); only False
fails a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field

from gpt.config import Args
from gpt.errors import GPTFlowError
from gpt.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, BootstrapCI

#: The spam split the gates watch.
GATE_SPLIT = "test"


class GatesArgs(Args):
    """Regression gates evaluated at the end of every pipeline run (``gates`` table)."""

    enabled: bool = True
    """Evaluate the gates at the end of each run and store the results in the ``gates``
    catalog table (False: skip them entirely)."""
    fail_run: bool = False
    """Fail the flow run when a gate fails (after every result is stored), so Prefect's
    automations and notifications fire. The nightly deployment sets it."""
    compare_to: Literal["previous", "last_passed"] = "previous"
    """The run the drop gates compare with: ``previous`` = the latest completed run of
    the same profile started before this one; ``last_passed`` = the latest such run none
    of whose gates failed (a regression then keeps failing until it is fixed)."""
    spam_test_max_drop: float | None = Field(1.0, ge=0)
    """How many percentage points the finetuned spam classifier's test accuracy may fall
    below the compared run's; None turns the gate off."""
    judge_mean_must_not_drop: bool = True
    """Fail when the paired bootstrap interval of the judge's mean score difference
    (this run − the compared run, per judge model and prompt version, on the examples
    both runs scored) lies wholly below 0."""
    finetuned_beats_best_baseline: bool = True
    """Fail unless the finetuned classifier's test accuracy is strictly higher than every
    baseline's (majority, logistic regressions) in the same run."""
    bootstrap_resamples: int = Field(DEFAULT_RESAMPLES, ge=100)
    """Resamples of the judge gate's paired bootstrap."""
    confidence: float = Field(DEFAULT_CONFIDENCE, gt=0, lt=1)
    """Coverage of the judge gate's bootstrap interval."""
    seed: int = DEFAULT_SEED
    """Seed of the judge gate's bootstrap."""


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict on one run (a row of the ``gates`` table)."""

    gate: str
    """The gate's name (its field in :class:`GatesArgs`)."""
    scope: str
    """What it looked at (the split, or the judge model and prompt version)."""
    passed: bool | None
    """True / False, or None when it could not be evaluated (see ``message``)."""
    value: float | None
    """The measured quantity (see each gate), in the threshold's unit."""
    threshold: float | None
    """The bound the value was held to."""
    compared_to_run: str | None
    """The run compared with (drop gates), else None."""
    message: str
    """One line a person can act on."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def spam_drop_gate(
    current: float | None,
    previous: float | None,
    max_drop: float,
    previous_run: str | None,
    split: str = GATE_SPLIT,
) -> GateResult:
    """``spam_test_max_drop``: value = points the accuracy fell (previous − current, in
    percentage points; negative = it rose); passes when value ≤ ``max_drop``."""
    name, scope = "spam_test_max_drop", split
    if previous_run is None:
        return GateResult(
            name, scope, None, None, max_drop, None, "no earlier completed run to compare with"
        )
    if current is None or previous is None:
        which = "this run" if current is None else f"run {previous_run}"
        return GateResult(
            name,
            scope,
            None,
            None,
            max_drop,
            previous_run,
            f"{which} has no finetuned spam accuracy on the {split} split",
        )
    drop = 100 * (previous - current)
    passed = drop <= max_drop + 1e-9
    verdict = "within" if passed else "exceeds"
    return GateResult(
        name,
        scope,
        passed,
        round(drop, 6),
        max_drop,
        previous_run,
        f"spam {split} accuracy {_pct(current)} vs {_pct(previous)} in run {previous_run}: "
        f"{'a drop' if drop > 0 else 'a change'} of {drop:+.1f} points ({verdict} the "
        f"allowed drop of {max_drop:g})",
    )


def judge_mean_gate(
    ci: BootstrapCI | None, scope: str, previous_run: str | None, why_none: str = ""
) -> GateResult:
    """``judge_mean_must_not_drop``: value = the mean score difference (this run −
    previous); fails when the bootstrap interval's upper end lies below 0."""
    name = "judge_mean_must_not_drop"
    if previous_run is None:
        return GateResult(
            name, scope, None, None, 0.0, None, "no earlier completed run to compare with"
        )
    if ci is None:
        return GateResult(name, scope, None, None, 0.0, previous_run, why_none or "no scores")
    passed = not ci.wholly_below_zero
    pct = round(100 * ci.confidence)
    return GateResult(
        name,
        scope,
        passed,
        round(ci.mean_diff, 6),
        0.0,
        previous_run,
        f"judge {scope}: mean score {ci.mean_diff:+.2f} vs run {previous_run} over {ci.n} "
        f"examples, {pct}% interval [{ci.low:+.2f}, {ci.high:+.2f}] "
        f"({'wholly below 0: a real drop' if not passed else 'not wholly below 0'}; "
        f"{ci.n_resamples} resamples, seed {ci.seed})",
    )


def baseline_gate(
    finetuned: float | None, baselines: Mapping[str, float], split: str = GATE_SPLIT
) -> GateResult:
    """``finetuned_beats_best_baseline``: value = finetuned − best baseline accuracy in
    percentage points; passes when it is > 0."""
    name = "finetuned_beats_best_baseline"
    if finetuned is None or not baselines:
        missing = "finetuned accuracy" if finetuned is None else "baseline accuracies"
        return GateResult(
            name, split, None, None, 0.0, None, f"this run has no {missing} on the {split} split"
        )
    best = max(sorted(baselines), key=lambda m: baselines[m])
    margin = 100 * (finetuned - baselines[best])
    passed = margin > 1e-9
    return GateResult(
        name,
        split,
        passed,
        round(margin, 6),
        0.0,
        None,
        f"finetuned spam {split} accuracy {_pct(finetuned)} vs best baseline {best} "
        f"{_pct(baselines[best])}: {margin:+.1f} points" + ("" if passed else " (must be higher)"),
    )


def failed(results: list[GateResult]) -> list[GateResult]:
    """The results whose gate failed (``passed is False``)."""
    return [r for r in results if r.passed is False]


class GateFailedError(GPTFlowError):
    """A regression gate failed; the message names each failed gate and by how much."""

    def __init__(self, run_id: str, results: list[GateResult]) -> None:
        self.run_id = run_id
        self.results = results
        lines = "; ".join(f"{r.gate} [{r.scope}]: {r.message}" for r in results)
        super().__init__(
            f"run {run_id}: {len(results)} regression gate(s) failed — {lines}. Every result "
            f"is stored; see `gptflow sql \"SELECT * FROM gates WHERE run_id = '{run_id}'\"` "
            "and `gptflow compare`"
        )


__all__ = [
    "GATE_SPLIT",
    "GateFailedError",
    "GateResult",
    "GatesArgs",
    "baseline_gate",
    "failed",
    "judge_mean_gate",
    "spam_drop_gate",
]
