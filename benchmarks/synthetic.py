"""Synthetic inputs for the benchmarks: SMS-like messages and prose-like corpora, seeded,
so every run measures the same work without depending on downloaded data."""

from __future__ import annotations

import numpy as np

__all__ = ["WORDS", "synthetic_corpus", "synthetic_messages"]

#: A small vocabulary of SMS-ish words (spam cues among them).
WORDS: list[str] = [
    "the",
    "a",
    "to",
    "you",
    "and",
    "is",
    "in",
    "it",
    "for",
    "of",
    "on",
    "call",
    "now",
    "free",
    "win",
    "prize",
    "cash",
    "text",
    "reply",
    "stop",
    "claim",
    "your",
    "we",
    "are",
    "me",
    "will",
    "be",
    "at",
    "home",
    "later",
    "ok",
    "see",
    "tonight",
    "love",
    "good",
    "day",
    "just",
    "got",
    "can",
    "not",
    "what",
    "when",
    "how",
    "do",
    "dont",
    "know",
    "going",
    "work",
    "tomorrow",
    "mobile",
    "offer",
    "urgent",
    "week",
    "send",
    "msg",
    "txt",
    "please",
    "thanks",
    "sorry",
    "happy",
    "lunch",
    "dinner",
    "meet",
    "sure",
    "yes",
    "no",
    "maybe",
    "new",
]
_SPAM_WORDS = {"free", "win", "prize", "cash", "claim", "urgent", "offer"}


def synthetic_messages(n: int, seed: int, max_words: int) -> tuple[list[str], list[int]]:
    """``n`` messages of 3..``max_words`` words; label 1 (spam) when a spam cue occurs."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    texts, labels = [], []
    for _ in range(n):
        k = int(rng.integers(3, max_words + 1))
        text = " ".join(words[rng.integers(0, len(words), k)])
        texts.append(text)
        labels.append(int(any(w in _SPAM_WORDS for w in text.split())))
    return texts, labels


def synthetic_corpus(n_bytes: int, seed: int = 0) -> str:
    """Random prose-like text of about ``n_bytes`` ASCII characters."""
    rng = np.random.default_rng(seed)
    vocab = np.array(
        WORDS
        + [w.capitalize() for w in WORDS[:40]]
        + ["said.", "again,", "Gisburn", "picture", "portrait", "1887", "studio", "he", "she"]
    )
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        chunk = " ".join(vocab[rng.integers(0, len(vocab), 200_000)]) + "\n"
        parts.append(chunk)
        size += len(chunk)
    return "".join(parts)[:n_bytes]
