"""What int8 weights cost against fp32 on a sample of the same prompts: the share of
greedy tokens that stay identical and the change of the judge's mean score.

Identical responses are not sent to the judge: the same text gets the same verdict
(temperature 0, the same seed), so they change nothing; only the pairs that differ are
scored, both sides, with the judge library's own :func:`~gpt.eval.judge.score_examples`.
The change is the sum of (int8 - fp32) scores over those pairs divided by the sample
size, i.e. the change of the mean over the whole sample. A judge that cannot be reached
is recorded as "not measured" with the reason, never guessed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gpt.errors import JudgeError

__all__ = [
    "Int8Cost",
    "judge_change",
    "measure_int8_cost",
    "sample_indices",
    "token_agreement",
]

log = logging.getLogger(__name__)


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spaced positions of ``n`` (all when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({(i * n) // k for i in range(k)})


def token_agreement(fp32: Sequence[Sequence[int]], int8: Sequence[Sequence[int]]) -> int:
    """How many of the fp32 tokens int8 reproduces at the same position."""
    return sum(
        sum(1 for j, t in enumerate(ref) if j < len(got) and got[j] == t)
        for ref, got in zip(fp32, int8, strict=True)
    )


@dataclass
class Int8Cost:
    """int8 against fp32 weights on ``examples`` prompts (greedy, same decoder)."""

    examples: int
    """Prompts decoded both ways (evenly spaced over the split)."""
    fp32_tokens: int
    """Tokens of the fp32 responses."""
    same_tokens: int
    """fp32 tokens that int8 reproduced at the same position."""
    identical_responses: int
    """Prompts whose int8 response is token for token the fp32 one."""
    fp32_seconds: float
    """What the fp32 reference decoding cost."""
    judge: dict[str, Any] = field(default_factory=dict)
    """``{"measured": True, "models": {model: {"mean_change", "pairs_judged",
    "pairs_unscored"}}}`` or ``{"measured": False, "reason": ...}``."""

    @property
    def identical_token_share(self) -> float | None:
        """``same_tokens / fp32_tokens`` (None without fp32 tokens)."""
        return self.same_tokens / self.fp32_tokens if self.fp32_tokens else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (with the share)."""
        return {**asdict(self), "identical_token_share": self.identical_token_share}

    def summary(self) -> str:
        """One line for logs and the stage's message."""
        share = self.identical_token_share
        text = (
            f"int8 weights vs fp32 on {self.examples} examples: "
            f"{'n/a' if share is None else f'{100 * share:.1f} %'} of greedy tokens identical, "
            f"{self.identical_responses}/{self.examples} responses identical"
        )
        if not self.judge.get("measured"):
            return f"{text}; judge's mean score change not measured ({self.judge.get('reason')})"
        parts = [
            f"{m} {v['mean_change']:+.2f} ({v['pairs_judged']} differing pairs judged)"
            if v["mean_change"] is not None
            else f"{m} n/a (no differing pair scored)"
            for m, v in self.judge["models"].items()
        ]
        return f"{text}; judge's mean score change {', '.join(parts)}"


def judge_change(
    pairs: Sequence[tuple[dict[str, Any], str, str]], sample: int, cfg: Any | None
) -> dict[str, Any]:
    """Score each differing ``(record, fp32 response, int8 response)`` pair with the judge
    of ``cfg`` (a :class:`~gpt.eval.judge.settings.JudgeConfig` or its dict); the change of the
    mean score over a sample of ``sample`` prompts, per judge model."""
    if cfg is None:
        return {"measured": False, "reason": "no judge settings were given"}
    from gpt.eval.judge.hosts import preflight
    from gpt.eval.judge.scoring import score_examples
    from gpt.eval.judge.settings import JudgeConfig

    cfg = cfg if isinstance(cfg, JudgeConfig) else JudgeConfig.model_validate(cfg)
    models = {m: {"mean_change": 0.0, "pairs_judged": 0, "pairs_unscored": 0} for m in cfg.models}
    if not pairs:
        return {"measured": True, "models": models}
    examples = []
    for i, (rec, fp32, int8) in enumerate(pairs):
        base = {k: rec.get(k, "") or "" for k in ("instruction", "input", "output")}
        examples += [{**base, "example_id": 2 * i, "response": fp32},
                     {**base, "example_id": 2 * i + 1, "response": int8}]  # fmt: skip
    try:
        preflight(cfg, progress=False)
        judgments = score_examples(examples, cfg, progress=False)
    except JudgeError as exc:
        return {"measured": False, "reason": f"judge unavailable: {exc}"}
    scores: dict[tuple[str, int], list[int]] = {}
    for j in judgments:
        if j.score is not None:
            scores.setdefault((j.judge_model, j.example_id), []).append(j.score)
    for m, out in models.items():
        total = 0.0
        for i in range(len(pairs)):
            a, b = scores.get((m, 2 * i)), scores.get((m, 2 * i + 1))
            if not a or not b:
                out["pairs_unscored"] += 1
                continue
            total += sum(b) / len(b) - sum(a) / len(a)
            out["pairs_judged"] += 1
        out["mean_change"] = total / sample if out["pairs_judged"] else None
    return {"measured": True, "models": models}


def measure_int8_cost(
    records: Sequence[dict[str, Any]],
    int8_tokens: Sequence[Sequence[int]],
    int8_responses: Sequence[str],
    *,
    sample: int,
    fp32: Callable[[list[int]], list[list[int]]],
    to_response: Callable[[list[int]], str],
    judge: Any | None,
) -> Int8Cost:
    """int8's cost on ``sample`` evenly spaced records: ``fp32(indices)`` decodes them with
    fp32 weights, ``to_response`` turns tokens into the response text the judge reads."""
    idx = sample_indices(len(records), sample)
    t0 = time.perf_counter()
    ref = fp32(idx)
    seconds = time.perf_counter() - t0
    got = [list(int8_tokens[i]) for i in idx]
    differing = [
        (records[i], to_response(r), int8_responses[i])
        for i, r, g in zip(idx, ref, got, strict=True)
        if list(r) != g
    ]
    return Int8Cost(
        examples=len(idx),
        fp32_tokens=sum(len(r) for r in ref),
        same_tokens=token_agreement(ref, got),
        identical_responses=len(idx) - len(differing),
        fp32_seconds=round(seconds, 3),
        judge=judge_change(differing, len(idx), judge),
    )
