"""Reading the score out of a judge's reply.

The judge is asked for structured output (:data:`~gpt.eval.judge.prompt.REPLY_SCHEMA`, sent as Ollama's
``format``), so a reply is normally a JSON object such as ``{"score": 85, "reason": …}``.
A server or model that ignores ``format`` answers in prose; the free-text rules below
then look for a score, and give ``None`` rather than a wrong number whenever the reply
is ambiguous. The rules, in order (the first that applies decides):

1. ``json`` — the reply (optionally in a code fence) is a JSON object: its ``score`` if
   that is a whole number in 0..100, else ``None``. Nothing else in it is looked at.
2. ``number`` — the reply is only a number (markdown emphasis and a final full stop
   allowed): that number if it is a whole number in 0..100, else ``None``.
3. ``label`` — labelled scores: ``Score: N`` (also ``score = N``, ``score is N``,
   ``"score": N``), ``N/100`` and ``N out of 100``. All must agree and lie in 0..100;
   a score on another scale (``Score: 8/10``) gives ``None``. Other numbers in the
   reply (explanations, criteria lists) are then ignored.
4. ``lone`` — otherwise the integers of the prose, after removing what is never a score:
   ranges (``0 to 100``, ``0-100``, ``between 0 and 100``), model names (``Llama3``,
   ``GPT-4``, ``Llama 3.1``), ordinals (``1st``) and numbered-list markers (``1.`` at the
   start of a line, when the reply holds a list or the marker is ``1``). If exactly one
   distinct value remains and it is a whole number in 0..100, that is the score; any
   other number (a second value, a decimal, a negative, a fraction ``8/10``, a year)
   makes the reply ambiguous: ``None``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["READER_VERSION", "ParsedScore", "parse_reply", "parse_score"]

#: The reader's version: a digest of this module's source, so any change to the rules is
#: a new version (part of the judge key; stored replies are read again under a new one).
READER_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class ParsedScore(NamedTuple):
    """A score and the rule that found it (both ``None`` when the reply holds none)."""

    score: int | None
    """0..100, or ``None``."""
    rule: str | None
    """``json``, ``number``, ``label`` or ``lone`` (see the module docstring)."""


_NONE = ParsedScore(None, None)

_FENCE = re.compile(r"^\s*```[A-Za-z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_ONLY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NUM = r"-?\d+(?:\.\d+)?"
#: ``Score: 85``, ``**Score:** 85``, ``"score": 85``, ``score is 85`` (+ optional ``/D``).
_LABEL = re.compile(
    r"\bscore\b[\s\"'*_`]*(?::|=|\bis\b|\bof\b)?[\s\"'*_`]*"
    rf"(?<![\w.])({_NUM})(?![\w])(?:\s*(?:/|\bout of\b|\bof\b)\s*(\d+))?",
    re.IGNORECASE,
)
#: ``85/100``, ``85 out of 100``, ``7 of 10`` (any denominator; checked afterwards).
_FRACTION = re.compile(
    rf"(?<![\w./-])({_NUM})\s*(?:/|\bout of\b|\bof\b)\s*(\d+)(?![\w.]?\d)", re.IGNORECASE
)
#: Spans that never hold a score.
_RANGE = re.compile(
    r"(?:\bbetween\s+)?(?<![\w.])\d+(?:\.\d+)?\s*(?:-|–|—|\bto\b|\band\b)\s*\d+(?:\.\d+)?(?![\w])",
    re.IGNORECASE,
)
_FAMILIES = "llama|mistral|mixtral|gpt|phi|gemma|qwen|claude|gemini|falcon|vicuna|deepseek"
_MODEL_NAME = re.compile(
    rf"\b(?:[A-Za-z]+[-_]?\d+(?:\.\d+)*[A-Za-z]*|(?:{_FAMILIES})\s+\d+(?:\.\d+)*)\b",
    re.IGNORECASE,
)
_ORDINAL = re.compile(r"\b\d+(?:st|nd|rd|th)\b", re.IGNORECASE)
_LIST_MARKER = re.compile(r"(?m)^\s*(\d+)[.)](?=\s+\D)")
_TOKEN = re.compile(rf"(?<![\w.])({_NUM})(?![\w]|\.\d)")


def _as_score(value: Any) -> int | None:
    """A JSON value as a 0..100 score (whole numbers only; booleans are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= 100:
        return value
    return None


def _number_text(token: str) -> int | None:
    """A number as written, if it is a whole number in 0..100."""
    if "." in token or token.startswith("-"):
        return None
    value = int(token)
    return value if value <= 100 else None


def _from_json(text: str) -> ParsedScore | None:
    """Rule 1; ``None`` when the reply is not a JSON object (the text rules apply)."""
    fenced = _FENCE.match(text)
    body = (fenced.group(1) if fenced else text).strip()
    if not body.startswith("{"):
        return None
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    keys = [k for k in obj if isinstance(k, str) and k.lower() == "score"]
    if len(keys) != 1:
        return _NONE
    score = _as_score(obj[keys[0]])
    return ParsedScore(score, "json") if score is not None else _NONE


def _mask(text: str, pattern: re.Pattern[str]) -> str:
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _list_markers(text: str) -> re.Pattern[str] | None:
    markers = _LIST_MARKER.findall(text)
    if len(markers) >= 2 or markers == ["1"]:
        return _LIST_MARKER
    return None


def _from_labels(text: str) -> ParsedScore | None:
    """Rule 3; ``None`` when the reply has no labelled score."""
    found: list[int | None] = []
    for m in _LABEL.finditer(text):
        denominator = m.group(2)
        found.append(_number_text(m.group(1)) if denominator in (None, "100") else None)
    for m in _FRACTION.finditer(text):
        if m.group(2) == "100":
            found.append(_number_text(m.group(1)))
    if not found:
        return None
    if None in found or len(set(found)) != 1:
        return _NONE
    return ParsedScore(found[0], "label")


def parse_reply(reply: str | None) -> ParsedScore:
    """The score in a judge reply and the rule that found it (see the module docstring)."""
    if not reply or not reply.strip():
        return _NONE
    parsed = _from_json(reply)
    if parsed is not None:
        return parsed
    bare = reply.strip().strip("*_`#\"' \n\t")
    bare = bare[:-1] if bare.endswith(".") else bare
    if _ONLY_NUMBER.fullmatch(bare):
        score = _number_text(bare)
        return ParsedScore(score, "number") if score is not None else _NONE

    text = _mask(reply, _RANGE)
    text = _mask(text, _MODEL_NAME)
    text = _mask(text, _ORDINAL)
    markers = _list_markers(text)
    if markers is not None:
        text = _mask(text, markers)
    parsed = _from_labels(text)
    if parsed is not None:
        return parsed
    if _FRACTION.search(text):  # a score on another scale (8/10)
        return _NONE
    tokens = {m.group(1) for m in _TOKEN.finditer(text)}
    if len(tokens) != 1:
        return _NONE
    score = _number_text(tokens.pop())
    return ParsedScore(score, "lone") if score is not None else _NONE


def parse_score(reply: str | None) -> int | None:
    """The 0..100 score in a judge reply, or ``None`` (:func:`parse_reply` without the rule)."""
    return parse_reply(reply).score
