"""Gates need evidence (issue 17, point 5): below a gate's minimum number of paired
examples (and, for the classifier gates, of discordant pairs) it reports "not enough
data" and passes; at or above it, it judges as before. The catalog-level behaviour (the
gates table, the report, an enforced run) is in ``test_compare.py``."""

from __future__ import annotations

import pytest

from gpt.eval.gates import (
    DEFAULT_MIN_DISCORDANT,
    DEFAULT_MIN_EXAMPLES,
    Evidence,
    GateResult,
    baseline_gate,
    judge_mean_gate,
    spam_drop_gate,
)
from gpt.eval.stats import paired_bootstrap_ci


def test_defaults_are_at_least_twenty_pairs_and_six_discordant() -> None:
    from gpt.eval.gates import GatesArgs

    args = GatesArgs()
    assert DEFAULT_MIN_EXAMPLES >= 20 and DEFAULT_MIN_DISCORDANT >= 6
    assert args.judge_min_examples == args.spam_test_min_examples == DEFAULT_MIN_EXAMPLES
    assert args.baseline_min_examples == DEFAULT_MIN_EXAMPLES
    assert args.spam_test_min_discordant == args.baseline_min_discordant == DEFAULT_MIN_DISCORDANT
    # six is the fewest discordant pairs with which McNemar's exact test can reach 0.05
    from gpt.eval.stats import mcnemar_exact

    assert mcnemar_exact(DEFAULT_MIN_DISCORDANT - 1, 0).p_value > 0.05
    assert mcnemar_exact(DEFAULT_MIN_DISCORDANT, 0).p_value < 0.05


def test_one_judged_example_is_not_a_real_drop() -> None:
    """The issue's example: one pair, 80 → 79."""
    r = judge_mean_gate(paired_bootstrap_ci([80], [79]), "llama3 v2", "r1")
    assert r.passed is True and r.verdict == "not enough data"
    assert r.n == 1 and r.value == pytest.approx(-1.0)
    assert r.message.startswith("not enough data (1 paired example(s), fewer than ")
    assert "gates.judge_min_examples = 20" in r.message


def test_enough_judged_examples_still_fail_a_real_drop() -> None:
    before = [80.0 + (i % 5) for i in range(25)]
    after = [b - 10 for b in before]
    ci = paired_bootstrap_ci(before, after, n_resamples=500)
    r = judge_mean_gate(ci, "llama3 v2", "r1")
    assert r.passed is False and r.verdict == "failed" and r.n == 25
    assert "wholly below 0: a real drop" in r.message
    # the minimum is a setting: 30 asked, 25 given
    thin = judge_mean_gate(ci, "llama3 v2", "r1", min_examples=30)
    assert thin.passed is True and thin.verdict == "not enough data"
    # and lowering it to 1 gives the one-example drop its (weak) verdict back
    one = judge_mean_gate(paired_bootstrap_ci([80], [79]), "x", "r1", min_examples=1)
    assert one.verdict == "failed"


@pytest.mark.parametrize(
    ("evidence", "verdict", "why"),
    [
        (None, "not enough data", "0 paired example(s)"),
        (Evidence(19, 19), "not enough data", "gates.spam_test_min_examples = 20"),
        (Evidence(200, 5), "not enough data", "gates.spam_test_min_discordant = 6"),
        (Evidence(20, 6), "failed", ""),
        (Evidence(200, 40), "failed", ""),
    ],
)
def test_spam_drop_gate_needs_pairs_and_discordant_pairs(
    evidence: Evidence | None, verdict: str, why: str
) -> None:
    r = spam_drop_gate(0.80, 0.90, 1.0, "r1", evidence=evidence)
    assert r.verdict == verdict and r.value == pytest.approx(10.0)
    assert r.passed is (verdict != "failed")
    assert why in r.message and "accuracy 80.0% vs 90.0%" in r.message


def test_a_gate_within_its_bound_passes_either_way() -> None:
    r = spam_drop_gate(0.90, 0.90, 1.0, "r1", evidence=Evidence(300, 0))
    assert r.passed is True and r.verdict == "not enough data"  # 0 discordant: no evidence
    r = spam_drop_gate(0.90, 0.90, 1.0, "r1", evidence=Evidence(300, 20))
    assert r.passed is True and r.verdict == "passed"


def test_baseline_gate_needs_pairs_and_discordant_pairs() -> None:
    accs = {"majority": 0.5, "logreg_bow": 0.95}
    thin = baseline_gate(0.90, accs, evidence=Evidence(10, 3))
    assert thin.passed is True and thin.verdict == "not enough data"
    assert "gates.baseline_min_examples = 20" in thin.message and "logreg_bow" in thin.message
    few = baseline_gate(0.90, accs, evidence=Evidence(300, 4))
    assert few.verdict == "not enough data" and "gates.baseline_min_discordant = 6" in few.message
    real = baseline_gate(0.90, accs, evidence=Evidence(300, 30))
    assert real.passed is False and real.verdict == "failed" and real.n == 300
    custom = baseline_gate(0.90, accs, evidence=Evidence(10, 3), min_examples=5, min_discordant=2)
    assert custom.verdict == "failed"


def test_not_evaluated_stays_not_evaluated() -> None:
    r = spam_drop_gate(0.8, 0.9, 1.0, None)
    assert r.passed is None and r.verdict == "not evaluated"
    assert judge_mean_gate(None, "judge", "r1", "no scores").verdict == "not evaluated"
    with pytest.raises(ValueError, match="unknown gate verdict"):
        GateResult("g", "s", True, None, None, None, "m", verdict="maybe")  # type: ignore[arg-type]
