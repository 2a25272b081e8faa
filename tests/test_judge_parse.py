"""Reading a score out of a judge reply: JSON first, then free-text rules that give NULL
rather than a wrong number. The corpus holds replies as judges write them."""

from __future__ import annotations

import pytest

from gpt.eval.judge.prompt import REPLY_SCHEMA
from gpt.eval.judge.reply import parse_reply, parse_score

#: (reply, expected score, rule that found it). ``None`` score: the reply holds no
#: unambiguous 0..100 score and must stay NULL.
CORPUS: list[tuple[str | None, int | None, str | None]] = [
    # --- structured output (what `format` asks for), and JSON written by hand
    ('{"score": 85, "reason": "Correct and concise."}', 85, "json"),
    ('{"score": 0}', 0, "json"),
    ('{"score": 100, "reason": "Matches the reference exactly."}', 100, "json"),
    ('{"score": 60, "reason": "Covers 2 of the 3 points in 1 sentence."}', 60, "json"),
    ('```json\n{"score": 77, "reason": "Minor errors."}\n```', 77, "json"),
    ('{"Score": 64}', 64, "json"),
    ('{"score": 150}', None, None),
    ('{"score": -5, "reason": "wrong"}', None, None),
    ('{"score": 85.5}', None, None),
    ('{"score": "high"}', None, None),
    ('{"score": true}', None, None),
    ('{"reason": "A good answer."}', None, None),
    ('{"score": 85, "reason": "Correct but ve', 85, "label"),  # cut off: text rules
    ('Here is my evaluation: {"score": 72, "reason": "ok"}', 72, "label"),
    # --- a reply that is only a number
    ("85", 85, "number"),
    (" 0\n", 0, "number"),
    ("100", 100, "number"),
    ("**72**", 72, "number"),
    ("85.", 85, "number"),
    ("```\n77\n```", 77, "number"),
    ("105", None, None),
    ("-5", None, None),
    ("85.5", None, None),
    # --- labelled scores
    ("Score: 90", 90, "label"),
    ("Score: 85/100", 85, "label"),
    ("**Score:** 72", 72, "label"),
    ("Final score: 64 out of 100", 64, "label"),
    ("I would rate this response 70/100.", 70, "label"),
    ("score = 55", 55, "label"),
    ("Score: 85\n\nThe response covers 3 of the 4 key points.", 85, "label"),
    ("Score: 150", None, None),
    ("Score: 8.5", None, None),
    ("Score: 8/10", None, None),
    ("Score 7 of 10", None, None),
    ("I give this a score of 85 out of 100 because it covers 3 points.", 85, "label"),
    ("Score: 70\n\nOn reflection, Score: 80", None, None),
    # --- the three replies first seen stored wrong (0, 3 and 1)
    ("On a scale from 0 to 100, I would give this response 85.", 85, "lone"),
    ("Llama3 says 80", 80, "lone"),
    (
        "1. Accuracy: the response names the right capital.\n"
        "2. Fluency: it reads well.\n\nScore: 90",
        90,
        "label",
    ),
    # --- one integer in prose
    ("I'd give it 85.", 85, "lone"),
    ("I would rate this 13.", 13, "lone"),
    ("The response is good. 64", 64, "lone"),
    ("The response is mostly right but not in the passive voice; 60 seems fair.", 60, "lone"),
    ("Between 0 and 100, this deserves 45.", 45, "lone"),
    ("On a 0-100 scale: 30", 30, "lone"),
    ("GPT-2's answer is only partly right, I'd say 50", 50, "lone"),
    ("As Llama 3, I rate it 75.", 75, "lone"),
    ("I'd give it 85. Definitely 85.", 85, "lone"),
    ("85%", 85, "lone"),
    ("85. The response is accurate and complete.", 85, "lone"),
    # --- markdown
    ("## Evaluation\n\nThe response is correct.\n\n**Score: 95**", 95, "label"),
    ("| criterion | value |\n|---|---|\n| overall | 88 |", 88, "lone"),
    # --- two different numbers, ranges, other scales: ambiguous, so NULL
    ("I'd give it 70 or maybe 80.", None, None),
    ("Somewhere around 70-80.", None, None),
    ("8/10", None, None),
    ("It gets 2 of the 3 points, so 67.", None, None),
    ("1. Accuracy: good", None, None),
    ("In 2024 this deserves 90.", None, None),
    ("This response would score 90 in my view.", 90, "label"),
    # --- refusals and no number
    ("I cannot evaluate this response.", None, None),
    ("I'm sorry, but I can't provide a score for this response.", None, None),
    ("eighty", None, None),
    ("", None, None),
    (None, None, None),
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40
    assert len({r for r, _, _ in CORPUS}) == len(CORPUS)  # no duplicates


@pytest.mark.parametrize(("reply", "expected", "rule"), CORPUS)
def test_parse_score_corpus(reply: str | None, expected: int | None, rule: str | None) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize(("reply", "expected", "rule"), CORPUS)
def test_parse_reply_names_the_rule(reply: str | None, expected: int | None, rule: str | None):
    parsed = parse_reply(reply)
    assert (parsed.score, parsed.rule) == (expected, rule)


def test_reply_schema_asks_for_an_integer_score() -> None:
    import jsonschema

    assert REPLY_SCHEMA["required"] == ["score"]
    assert REPLY_SCHEMA["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 100}
    jsonschema.validate({"score": 85, "reason": "ok"}, REPLY_SCHEMA)
    for bad in ({"score": 101}, {"score": 8.5}, {"reason": "x"}, {"score": 5, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, REPLY_SCHEMA)
