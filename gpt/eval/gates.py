"""Regression gates: rules a scheduled run's results must pass.

The settings (:class:`GatesArgs`) are the pipeline config's ``gates`` section. Each
check below is a pure function of numbers the catalog holds and returns a
:class:`GateResult`: ``passed`` is True or False, or None when the gate could not be
evaluated (no earlier run to compare with, a stage that produced nothing); only False
fails a run.

A verdict needs evidence. Each gate compares paired examples (the same test messages
classified by two classifiers, the same instructions judged in two runs) and has a
minimum (:class:`GatesArgs`): at least ``*_min_examples`` paired examples (default 20)
and, for the classifier gates, at least ``*_min_discordant`` discordant pairs — examples
exactly one of the two classifiers gets right, the only ones McNemar's test (and any
accuracy difference) rests on; the default 6 is the fewest with which the exact
two-sided test can reach p < 0.05 at all (5 one-sided pairs give p = 0.0625). Below a
minimum the gate reports "not enough data" (``verdict``) and passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from pydantic import Field

from gpt.config import Args
from gpt.errors import GPTFlowError
from gpt.eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, BootstrapCI

#: The spam split the gates watch.
GATE_SPLIT = "test"
#: Paired examples a gate needs by default for a verdict.
DEFAULT_MIN_EXAMPLES = 20
#: Discordant pairs a classifier gate needs by default (see the module docstring).
DEFAULT_MIN_DISCORDANT = 6
#: What a gate concluded (the ``verdict`` column of ``gates``).
Verdict = Literal["passed", "failed", "not evaluated", "not enough data"]


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
    spam_test_min_examples: int = Field(DEFAULT_MIN_EXAMPLES, ge=1)
    """``spam_test_max_drop`` needs at least this many test messages classified by both
    runs' classifiers; with fewer it reports "not enough data" and passes."""
    spam_test_min_discordant: int = Field(DEFAULT_MIN_DISCORDANT, ge=0)
    """… and at least this many of them that exactly one of the two classifiers gets
    right (McNemar's discordant pairs)."""
    judge_min_examples: int = Field(DEFAULT_MIN_EXAMPLES, ge=1)
    """``judge_mean_must_not_drop`` needs at least this many examples scored in both runs
    (per judge model and prompt version); with fewer it reports "not enough data" and
    passes."""
    baseline_min_examples: int = Field(DEFAULT_MIN_EXAMPLES, ge=1)
    """``finetuned_beats_best_baseline`` needs at least this many test messages
    classified by both the finetuned classifier and the best baseline; with fewer it
    reports "not enough data" and passes."""
    baseline_min_discordant: int = Field(DEFAULT_MIN_DISCORDANT, ge=0)
    """… and at least this many of them that exactly one of the two gets right."""


@dataclass(frozen=True)
class Evidence:
    """What a gate's verdict rests on: the paired examples of the two things it
    compares."""

    n: int
    """Paired examples."""
    discordant: int | None = None
    """Of those, how many exactly one of two classifiers got right (McNemar's ``b + c``);
    None for a gate on scores."""

    def shortfall(self, min_examples: int, min_discordant: int | None, what: str) -> str | None:
        """Why this is too little for a verdict (naming the settings), else None."""
        if self.n < min_examples:
            return (
                f"{self.n} paired example(s), fewer than gates.{what}_min_examples = {min_examples}"
            )
        if min_discordant is not None and (self.discordant or 0) < min_discordant:
            return (
                f"{self.discordant or 0} discordant pair(s) (examples only one of the two "
                f"classifiers gets right) among {self.n}, fewer than "
                f"gates.{what}_min_discordant = {min_discordant}"
            )
        return None


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
    n: int | None = None
    """Paired examples the verdict rests on (None when there were none to pair)."""
    verdict: Verdict | None = None
    """``passed``, ``failed``, ``not evaluated`` (``passed`` None) or ``not enough data``
    (below the gate's minimum: ``passed`` is True); filled in from ``passed`` when not
    given."""

    def __post_init__(self) -> None:
        if self.verdict is None:
            v = {True: "passed", False: "failed", None: "not evaluated"}[self.passed]
            object.__setattr__(self, "verdict", v)
        if self.verdict not in get_args(Verdict):
            raise ValueError(f"unknown gate verdict {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


def _judged(result: GateResult, evidence: Evidence, shortfall: str | None) -> GateResult:
    """``result`` with its evidence; below the gate's minimum it passes as "not enough
    data", keeping the measured value and saying what it would have concluded."""
    if shortfall is None:
        return GateResult(**{**asdict(result), "n": evidence.n})
    return GateResult(
        **{
            **asdict(result),
            "passed": True,
            "n": evidence.n,
            "verdict": "not enough data",
            "message": f"not enough data ({shortfall}): passes without a verdict; {result.message}",
        }
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def spam_drop_gate(
    current: float | None,
    previous: float | None,
    max_drop: float,
    previous_run: str | None,
    split: str = GATE_SPLIT,
    *,
    evidence: Evidence | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    min_discordant: int = DEFAULT_MIN_DISCORDANT,
) -> GateResult:
    """``spam_test_max_drop``: value = points the accuracy fell (previous − current, in
    percentage points; negative = it rose); passes when value ≤ ``max_drop``.
    ``evidence``: the test messages both classifiers classified (none: no verdict)."""
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
    evidence = evidence or Evidence(0, 0)
    result = GateResult(
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
    return _judged(result, evidence, evidence.shortfall(min_examples, min_discordant, "spam_test"))


def judge_mean_gate(
    ci: BootstrapCI | None,
    scope: str,
    previous_run: str | None,
    why_none: str = "",
    *,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
) -> GateResult:
    """``judge_mean_must_not_drop``: value = the mean score difference (this run −
    previous); fails when the bootstrap interval's upper end lies below 0 — given at
    least ``min_examples`` paired examples (``ci.n``)."""
    name = "judge_mean_must_not_drop"
    if previous_run is None:
        return GateResult(
            name, scope, None, None, 0.0, None, "no earlier completed run to compare with"
        )
    if ci is None:
        return GateResult(name, scope, None, None, 0.0, previous_run, why_none or "no scores")
    passed = not ci.wholly_below_zero
    pct = round(100 * ci.confidence)
    result = GateResult(
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
    evidence = Evidence(ci.n)
    return _judged(result, evidence, evidence.shortfall(min_examples, None, "judge"))


def best_baseline(baselines: Mapping[str, float]) -> str:
    """The baseline with the highest accuracy (ties: the first by name)."""
    return max(sorted(baselines), key=lambda m: baselines[m])


def baseline_gate(
    finetuned: float | None,
    baselines: Mapping[str, float],
    split: str = GATE_SPLIT,
    *,
    evidence: Evidence | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    min_discordant: int = DEFAULT_MIN_DISCORDANT,
) -> GateResult:
    """``finetuned_beats_best_baseline``: value = finetuned − best baseline accuracy in
    percentage points; passes when it is > 0. ``evidence``: the test messages both the
    finetuned classifier and the best baseline classified (none: no verdict)."""
    name = "finetuned_beats_best_baseline"
    if finetuned is None or not baselines:
        missing = "finetuned accuracy" if finetuned is None else "baseline accuracies"
        return GateResult(
            name, split, None, None, 0.0, None, f"this run has no {missing} on the {split} split"
        )
    best = best_baseline(baselines)
    margin = 100 * (finetuned - baselines[best])
    passed = margin > 1e-9
    evidence = evidence or Evidence(0, 0)
    result = GateResult(
        name,
        split,
        passed,
        round(margin, 6),
        0.0,
        None,
        f"finetuned spam {split} accuracy {_pct(finetuned)} vs best baseline {best} "
        f"{_pct(baselines[best])}: {margin:+.1f} points" + ("" if passed else " (must be higher)"),
    )
    return _judged(result, evidence, evidence.shortfall(min_examples, min_discordant, "baseline"))


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
    "DEFAULT_MIN_DISCORDANT",
    "DEFAULT_MIN_EXAMPLES",
    "GATE_SPLIT",
    "Evidence",
    "GateFailedError",
    "GateResult",
    "GatesArgs",
    "Verdict",
    "baseline_gate",
    "best_baseline",
    "failed",
    "judge_mean_gate",
    "spam_drop_gate",
]
