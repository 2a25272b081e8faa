"""The reader: the score in a judge's reply, or none — it never guesses.

A score is read only when the reply gives exactly one score on the 0–100 scale. Every
other reply is *unparsed* (``None``; the raw reply is kept and counted in
``n_unparsed``): a NULL costs one example, a wrong number skews every mean it enters.

1. ``json`` — a reply holding ``{`` must hold one JSON object (a code fence or a lead-in
   without digits around it is fine) with exactly one ``score`` key whose value is a
   whole number 0–100 (an integer, or a string of digits). Unparsed: truncated or
   malformed JSON, two objects, an array, a decimal or exponent (``85.0``, ``1e2``), a
   number or another ``…score…`` key beside it, and a text value that speaks of another
   scale or gives a different labelled score (``"reason": "8/10"``, ``"Score: 70"``).
2. ``number`` — the reply is only a whole number 0–100 (emphasis, quotes, a final full
   stop allowed): ``85``, ``**72**``, ``85.``.
3. ``label`` / ``lone`` — prose: the numbers left once these are set aside as not
   scores: the 0–100 scale itself (``0-100``, ``0 to 100``, ``between 0 and 100``,
   ``out of 100``, ``/100``, ``max 100``, ``a 100-point scale``), model names (``GPT-4``,
   ``Llama 3.1``, ``llama3:8b``), ordinals (``1st``) and numbered-list markers. Exactly
   one distinct whole number 0–100 must remain (repeated as often as it likes);
   ``label`` when it follows a label on its line (``Score: 85``, ``rate it 85``), else
   ``lone``.

Always unparsed, whatever else the reply says:

- another scale: ``8/10``, ``7 out of 10``, ``out of ten``, ``on a scale of 1 to 10``,
  ``Rating (1-5)``, ``a ten-point scale``, ``max 10``, stars (``★★★★☆``, ``4 stars``);
- ranges (``70-80``, ``between 70 and 80``, ``from 85 to 60``) and bounds (``>80``,
  ``at least 80``, ``80+``); decimals (``8.5``), exponents (``1.0e2``, ``10^2``,
  ``10²``), signs (``-5``, ``+5``), numbers with units or separators (``85pts``,
  ``1,000``), half a fraction (``85/``), digits other than ASCII ones;
- two different candidates: the reference's and the response's, before and after a
  revision (``Score: 85 -> I revise it to 60``), a criterion's and the total, a count
  and a score;
- one number that is not this response's score: said of the reference, an earlier
  verdict or another model compared with, earlier in its sentence (``the reference
  answer deserves 100``, ``compared to GPT-4 (score 90)``, ``originally 90``); under a
  condition (``it would be 90 if the tense were right``); a count (``12 words``);
- no number at all (``eighty``, refusals).

:data:`READER_VERSION` is part of the judge key: replies stored under an older reader are
read again by this one when the judge stage next runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal
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

# --------------------------------------------------------------------------- patterns

_WORD_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20,
    "hundred": 100, "a hundred": 100, "one hundred": 100,
}  # fmt: skip
_WORD = "|".join(sorted((re.escape(w) for w in _WORD_NUMBERS), key=len, reverse=True))
#: A number as written: digits (maybe with a decimal part) or a number word.
_QTY = rf"(?:\d+(?:\.\d+)?|(?:{_WORD})\b)"
#: Dashes as ``-``; markdown emphasis and code marks dropped (``**85**/**100**``).
_NORMAL = str.maketrans({"–": "-", "—": "-", "−": "-", "‐": "-", "‑": "-", "*": None, "`": None})

#: Exponents, and digits or fractions written as symbols (``10²``, ``8½``, keycap emoji).
_EXPONENT = re.compile(
    r"\d\s*[eE]\s*[-+]?\s*\d|\d\s*(?:[x×*]\s*10\s*)?(?:\^|\*\*)\s*[-+]?\d"
    r"|[⁰¹²³⁴⁵⁶⁷⁸⁹¼½¾⅐-⅞\u20e3\U0001f51f]"
)
_STARS = re.compile(r"[★☆⭐✩✪✫✬✭✮✯]|\bstars?\b", re.IGNORECASE)
_SIGNED = re.compile(r"(?<![\w.])[-+]\d")
#: ``A-B``, ``A to B``, ``between A and B``, ``from A to B`` (digits or number words).
_RANGE = re.compile(
    rf"(?:\bbetween\s+|\bfrom\s+)?(?<![\w.])({_QTY})\s*(?:-|\bto\b|\band\b|\bthrough\b)\s*"
    rf"({_QTY})(?![\w]|\.\d)",
    re.IGNORECASE,
)
_FRACTION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\w]|\.\d)")
_OUT_OF = re.compile(rf"\bout\s+of\s+(?:a\s+(?:possible\s+)?|possible\s+)?({_QTY})", re.I)
_POINT_SCALE = re.compile(rf"(?<![\w.])({_QTY})[\s-]*points?[\s-]+scale\b", re.IGNORECASE)
_SCALE_OF = re.compile(rf"\bscale\s+of\s+(?:a\s+)?({_QTY})(?!\s*(?:-|to\b|and\b))", re.I)
_MAXIMUM = re.compile(
    rf"\bmax(?:imum|\.)?(?:\s+(?:score|possible|rating|of|is))*\s*[:=]?\s*({_QTY})", re.I
)

_FAMILIES = (
    "llama|mistral|mixtral|gpt|phi|gemma|qwen|claude|gemini|falcon|vicuna|deepseek|"
    "chatgpt|olmo|yi|command|codellama|starcoder|granite"
)
_MODEL_NAME = re.compile(
    rf"\b(?:[A-Za-z]+(?:[-_.:]?\d+(?:\.\d+)*[A-Za-z]*)+|(?:{_FAMILIES})\s+\d+(?:\.\d+)*[A-Za-z]*)"
    r"(?:[-_:]\d+(?:\.\d+)*[A-Za-z]+)*",
    re.IGNORECASE,
)
_ORDINAL = re.compile(r"\b\d+(?:st|nd|rd|th)\b", re.IGNORECASE)
_LIST_MARKER = re.compile(r"(?m)^\s*(\d+)[.)](?=\s+[^\d\s])")
#: Every digit run, with what is glued to it (a candidate is only a bare whole number).
_NUMBER = re.compile(r"[A-Za-z0-9.,]*\d[A-Za-z0-9.,]*")
_LABEL = re.compile(
    r"\b(?:scor(?:e|ed|es|ing)|rat(?:e|ed|es|ing)|grade[sd]?|gives?|giving|gave|verdict"
    r"|assign(?:s|ed)?|marks?|deserves?|earns?|gets?)\b[^\d\n]{0,25}$",
    re.IGNORECASE,
)
#: What a number is said of when it is not this response's score.
_VERDICT = r"(?:score|rating|grade|verdict|assessment|mark)"
_FOREIGN = re.compile(
    r"\b(?:references?|baseline|model\s+answer|correct\s+(?:answer|output)"
    r"|(?:expected|ideal|perfect)\s+(?:answer|output|response|solution)"
    r"|gold(?:en)?\s+(?:answer|output|standard)"
    rf"|(?:original|initial|previous|earlier|first|old)\s+{_VERDICT}"
    r"|originally|initially|previously|at\s+first|first\s+draft"
    r"|compared?\s+(?:to|with)|versus|vs|other\s+(?:response|answer|model)"
    r"|would\s+have|could\s+have|had\s+(?:it|this|the\s+response))\b",
    re.IGNORECASE,
)
#: A condition anywhere in the sentence: the number may be what the response would get.
_CONDITION = re.compile(
    r"\b(?:if|unless|were\s+it|had\s+it)\b[^.;!?\n]*\b(?:were|was|had|did|used|included)\b",
    re.IGNORECASE,
)
#: A bound (``>80``, ``at least 80``, ``80+``) or a count (``12 words``) is not a score.
_BOUND = re.compile(
    r"[<>≤≥]\s*\d|\d\s*\+(?!\s*\d)|\b(?:at\s+(?:least|most)|more\s+than|less\s+than"
    r"|fewer\s+than|no\s+(?:more|less)\s+than|above|below|upwards\s+of|over|under)\s+\d",
    re.IGNORECASE,
)
_COUNT = re.compile(
    r"\d\s+(?:\w+\s+)?(?:words?|sentences?|paragraphs?|lines?|characters?|letters?|tokens?"
    r"|errors?|mistakes?|issues?|typos?|items?|steps?|criteria|criterion|examples?|times"
    r"|minutes?|seconds?|hours?|days?|weeks?|months?|years?|facts?|parts?|bullets?)\b"
    r"|\b(?:length|count|number\s+of\s+\w+|word\s+count)\s*[:=]?\s*\d",
    re.IGNORECASE,
)
_CLAUSE_END = re.compile(r"[;!?\n]|\.(?!\d)")

_FENCE = re.compile(r"```[A-Za-z]*")


# --------------------------------------------------------------------------- helpers


def _quantity(token: str) -> float | None:
    token = token.strip().lower()
    if token in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[token])
    try:
        return float(token)
    except ValueError:
        return None


def _is_hundred_scale(low: str | None, high: str) -> bool:
    """Whether ``low``–``high`` (or ``out of high``) is the 0–100 (or 1–100) scale."""
    return _quantity(high) == 100 and (low is None or _quantity(low) in (0, 1))


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _mask_scales(text: str) -> str | None:
    """``text`` with the statements of the 0–100 scale blanked out; ``None`` when the
    reply speaks of another scale, a range or a fraction other than N/100."""
    for pattern in (_RANGE, _OUT_OF, _POINT_SCALE, _SCALE_OF, _MAXIMUM):
        while (m := pattern.search(text)) is not None:
            low, high = (m.group(1), m.group(2)) if pattern is _RANGE else (None, m.group(1))
            if not _is_hundred_scale(low, high):
                return None
            text = _blank(text, m.start(), m.end())
    while (m := _FRACTION.search(text)) is not None:
        if _quantity(m.group(2)) != 100 or "." in m.group(2):
            return None
        text = _blank(text, m.end(1), m.end())  # keep the numerator: it is the score
    if re.search(r"\d\s*/|/\s*\d", text):  # half a fraction (a cut-off reply)
        return None
    return text


def _masked(text: str) -> str | None:
    """The reply with what is never a score blanked out, or ``None`` when it speaks of
    another scale (see the module docstring)."""
    if _EXPONENT.search(text) or _STARS.search(text):
        return None
    text = text.translate(_NORMAL)
    text = _mask_scales(text)  # ranges first: "70 - 80" is a range, not a sign
    if text is None or _SIGNED.search(text):
        return None
    for pattern in (_MODEL_NAME, _ORDINAL):
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    markers = _LIST_MARKER.findall(text)
    if len(markers) >= 2 or markers == ["1"]:
        text = _LIST_MARKER.sub(lambda m: " " * len(m.group(0)), text)
    return text


def _candidates(masked: str) -> list[tuple[int | None, int]]:
    """``(value, position)`` of every number left in a masked text (value ``None`` for
    one that cannot be a score: a decimal, a unit glued on, out of range)."""
    out: list[tuple[int | None, int]] = []
    for m in _NUMBER.finditer(masked):
        token = m.group(0).rstrip(".,")
        if token.isascii() and token.isdigit() and int(token) <= 100:
            out.append((int(token), m.start()))
        else:
            out.append((None, m.start()))
    return out


def _said_of_another(text: str, pos: int) -> bool:
    """Whether the number at ``pos`` is said of something other than this response (the
    reference, an earlier verdict, another model, a counterfactual) earlier in its
    sentence."""
    starts = [m.end() for m in _CLAUSE_END.finditer(text, 0, pos)]
    start = starts[-1] if starts else 0
    end_match = _CLAUSE_END.search(text, pos)
    sentence = text[start : end_match.start() if end_match else len(text)]
    return _FOREIGN.search(text[start:pos]) is not None or _CONDITION.search(sentence) is not None


def _labelled(text: str, pos: int) -> bool:
    """Whether the number at ``pos`` follows a label (``Score:``, ``rate it``)."""
    line_start = text.rfind("\n", 0, pos) + 1
    return _LABEL.search(text[line_start:pos]) is not None


# --------------------------------------------------------------------------- rules


def _from_text(text: str) -> ParsedScore:
    """Rules 2 and 3."""
    bare = text.strip().strip("*_`#\"' \n\t")
    bare = bare[:-1] if bare.endswith(".") else bare
    if bare.isascii() and bare.isdigit():
        value = int(bare)
        return ParsedScore(value, "number") if value <= 100 else _NONE
    masked = _masked(text)
    if masked is None or _BOUND.search(masked) or _COUNT.search(masked):
        return _NONE
    found = _candidates(masked)
    values = {v for v, _ in found}
    if len(values) != 1 or None in values:
        return _NONE
    if any(_said_of_another(text.translate(_NORMAL), pos) for _, pos in found):
        return _NONE
    labelled = any(_labelled(masked, pos) for _, pos in found)
    return ParsedScore(values.pop(), "label" if labelled else "lone")


class _Malformed(ValueError):
    """JSON the reader refuses (a duplicate key, NaN, Infinity)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Malformed(f"duplicate keys in {keys}")
    return dict(pairs)


def _constant(name: str) -> Any:
    raise _Malformed(name)


def _has_number(value: Any) -> bool:
    """Whether a JSON value holds a number anywhere (booleans are not numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | Decimal):
        return True
    if isinstance(value, dict):
        return any(_has_number(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_number(v) for v in value)
    return False


def _conflicts(text: str, score: int) -> bool:
    """Whether a text beside a JSON score speaks of another scale or gives a different
    labelled score."""
    masked = _masked(text)
    if masked is None:
        return True
    return any(v != score and _labelled(masked, pos) for v, pos in _candidates(masked))


def _json_score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 100 else None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
        return number if number <= 100 else None
    return None


def _from_json(text: str) -> ParsedScore | None:
    """Rule 1; ``None`` when the reply holds no ``{`` (the text rules apply)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0:
        return None
    if end < start:
        return _NONE  # truncated
    try:
        obj = json.loads(
            text[start : end + 1],
            parse_float=Decimal,
            parse_constant=_constant,
            object_pairs_hook=_object,
        )
    except (ValueError, RecursionError):
        return _NONE
    outside = _FENCE.sub(" ", text[:start] + " " + text[end + 1 :])
    masked = _masked(outside)
    if not isinstance(obj, dict) or masked is None or _candidates(masked) or "[" in outside:
        return _NONE
    keys = [k for k in obj if k.strip().lower() == "score"]
    if len(keys) != 1:
        return _NONE
    score = _json_score(obj[keys[0]])
    if score is None:
        return _NONE
    for key, value in obj.items():
        if key == keys[0]:
            continue
        if "score" in key.lower() or _has_number(value):
            return _NONE
        texts = [value] if isinstance(value, str) else []
        if any(_conflicts(t, score) for t in texts):
            return _NONE
    return ParsedScore(score, "json")


def parse_reply(reply: str | None) -> ParsedScore:
    """The score in a judge reply and the rule that found it (see the module docstring)."""
    if not reply or not reply.strip():
        return _NONE
    if any(c.isdigit() and not c.isascii() for c in reply):
        return _NONE
    parsed = _from_json(reply)
    return parsed if parsed is not None else _from_text(reply)


def parse_score(reply: str | None) -> int | None:
    """The 0..100 score in a judge reply, or ``None`` (:func:`parse_reply` without the rule)."""
    return parse_reply(reply).score
