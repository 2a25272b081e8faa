"""Draft tokens for multi-token decoding: prompt lookup (no second model).

Instruction responses and repetitive continuations often copy phrases of their prompt or
of themselves. :class:`PromptLookup` keeps, per row, where each n-gram of the text last
occurred with a token after it; the draft continues the text's current suffix as it
continued there. A draft is only a guess: the decoder verifies every drafted token
against the model, so drafts change how fast decoding is, never what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NgramIndex", "PromptLookup"]


class NgramIndex:
    """One row's text and, for every n-gram of it (``min_n <= n <= max_n``), the position
    of the token that followed its latest occurrence."""

    def __init__(self, tokens: Sequence[int], max_n: int, min_n: int) -> None:
        self.max_n = max_n
        self.min_n = min_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        """Append tokens to the text (and index the n-grams they complete)."""
        toks = self.tokens
        for t in new:
            p = len(toks)
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self._next[tuple(toks[p - n : p])] = p
            toks.append(int(t))

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that continue the text's longest indexed suffix n-gram as
        its latest earlier occurrence continued (copying on through the draft itself when
        that occurrence is recent: a loop of period ``len - p`` drafts the loop)."""
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            p = self._next.get(tuple(toks[len(toks) - n :]))
            if p is None:
                continue
            out: list[int] = []
            for i in range(k):
                j = p + i
                out.append(toks[j] if j < len(toks) else out[j - len(toks)])
            return out
        return []


@dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup drafting: n-grams of ``max_ngram`` down to ``min_ngram`` tokens of the
    prompt and the generated text are matched against the text's suffix."""

    max_ngram: int = 3
    """Longest suffix n-gram looked up (longer matches are tried first)."""
    min_ngram: int = 1
    """Shortest suffix n-gram looked up."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"PromptLookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                f"{self.max_ngram}"
            )

    def index(self, tokens: Sequence[int]) -> NgramIndex:
        """A fresh index over one row's prompt."""
        return NgramIndex(tokens, self.max_ngram, self.min_ngram)
