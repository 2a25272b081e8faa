"""The reader never guesses (issue 17, point 2): a number is stored only when the reply
gives exactly one score on the 0–100 scale. The corpus holds replies as judges write
them, by class; every example the issue lists is one of them. The same corpus is read
through the real ``gptflow judge`` path (the Ollama stand-in replying each text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gpt.eval.judge.prompt import REPLY_SCHEMA
from gpt.eval.judge.reply import parse_reply, parse_score

#: (reply, expected score, rule that found it). ``None``: unparsed.
Case = tuple[str | None, int | None, str | None]

#: The replies issue 17 lists as read wrong (9, 8, 7, 8, 85, 8, 1, 90, 100 before).
ISSUE_EXAMPLES: list[Case] = [
    ("On a scale of 1 to 10, I give it 9.", None, None),
    ("Rating (1-10): 8", None, None),
    ("Score: 7 out of ten", None, None),
    ("Score: 8 (out of 10)", None, None),
    ("Score: 85 -> after re-reading, I revise it to 60.", None, None),
    ('{"score": 8', None, None),
    ("score: 1.0e2", None, None),
    ("Compared to GPT-4 (score 90), this response gets 40.", None, None),
    ("Reference answer score: 100. This response: 40.", None, None),
]

PLAIN_JSON: list[Case] = [
    ('{"score": 85, "reason": "Correct and concise."}', 85, "json"),
    ('{"score": 0}', 0, "json"),
    ('{"score": 100, "reason": "Matches the reference exactly."}', 100, "json"),
    ('{"score": 60, "reason": "Covers 2 of the 3 points in 1 sentence."}', 60, "json"),
    ('```json\n{"score": 77, "reason": "Minor errors."}\n```', 77, "json"),
    ('```\n{"score": 41}\n```', 41, "json"),
    ('{"Score": 64}', 64, "json"),
    ('{"reason": "Good but wordy.", "score": 70}', 70, "json"),
    ('{\n  "score": 93,\n  "reason": "Accurate, clear and complete."\n}', 93, "json"),
    ('Here is my evaluation: {"score": 72, "reason": "ok"}', 72, "json"),
    ('{"score": "85"}', 85, "json"),
    ('{"score": 55, "reason": "Score: 55 because the tense is wrong."}', 55, "json"),
    ('{"score": 30, "reason": "The response uses the active voice."}', 30, "json"),
    ('{"score": 88, "reason": "Good; GPT-2 style phrasing."}', 88, "json"),
    ('{"score": 12, "reason": "Wrong answer.", "confident": true}', 12, "json"),
    ('{"score": 99, "explanation": "Nearly perfect."}', 99, "json"),
    ('{"score":50,"reason":"half right"}', 50, "json"),
    ('Sure! {"score": 66, "reason": "Partially correct."}', 66, "json"),
    ('{"score": 75, "reason": "Uses 2 sentences where 1 would do."}', 75, "json"),
    ('{"score": 20, "reason": "Off topic."}\n', 20, "json"),
]

PLAIN_TEXT: list[Case] = [
    ("85", 85, "number"),
    (" 0\n", 0, "number"),
    ("100", 100, "number"),
    ("**72**", 72, "number"),
    ("85.", 85, "number"),
    ("```\n77\n```", 77, "number"),
    ('"64"', 64, "number"),
    ("Score: 90", 90, "label"),
    ("Score: 85/100", 85, "label"),
    ("**Score:** 72", 72, "label"),
    ("Final score: 64 out of 100", 64, "label"),
    ("I would rate this response 70/100.", 70, "label"),
    ("score = 55", 55, "label"),
    ("Score: 0", 0, "label"),
    ("Score: 100/100", 100, "label"),
    ("SCORE: 47", 47, "label"),
    ("Score: [81]", 81, "label"),
    ("Rating: 68", 68, "label"),
    ("I give this a score of 85 out of 100.", 85, "label"),
    ("On a scale from 0 to 100, I would give this response 85.", 85, "label"),
    ("On a scale of 0-100: 30", 30, "lone"),
    ("Between 0 and 100, this deserves 45.", 45, "label"),
    ("On a 100-point scale, this response earns 62.", 62, "label"),
    ("Score (0-100): 58", 58, "label"),
    ("Llama3 says 80", 80, "lone"),
    ("As Llama 3, I rate it 75.", 75, "label"),
    ("GPT-2's answer is only partly right, I'd say 50", 50, "lone"),
    ("I'd give it 85.", 85, "label"),
    ("I would rate this 13.", 13, "label"),
    ("The response is good. 64", 64, "lone"),
    ("The response is mostly right but not in the passive voice; 60 seems fair.", 60, "lone"),
    ("I'd give it 85. Definitely 85.", 85, "label"),
    ("85%", 85, "lone"),
    ("85. The response is accurate and complete.", 85, "lone"),
    ("## Evaluation\n\nThe response is correct.\n\n**Score: 95**", 95, "label"),
    ("| criterion | value |\n|---|---|\n| overall | 88 |", 88, "lone"),
    ("This response would score 90 in my view.", 90, "label"),
    (
        "1. Accuracy: the response names the right capital.\n"
        "2. Fluency: it reads well.\n\nScore: 90",
        90,
        "label",
    ),
    ("The response matches the reference exactly. Score: 100", 100, "label"),
    ("Score: 35\nReason: the response misses the point.", 35, "label"),
    ("My score is 78!", 78, "label"),
    ("Verdict: 15 (the answer is wrong)", 15, "label"),
    ("Score: 42 — the response is incomplete.", 42, "label"),
    ("This deserves a 91.", 91, "label"),
    ("Overall I'd rate this answer at 66 points.", 66, "label"),
    ("Score: 85 (eighty-five)", 85, "label"),
    ("Final Score - 85", 85, "label"),
    ("Score: 85 (max 100)", 85, "label"),
    ("After re-reading, I revise my score to 60.", 60, "label"),
    ("Unlike the reference answer, this is wrong. 20", 20, "lone"),
    ("Score: 85 out of a possible 100", 85, "label"),
    ("**Score**: **85**/**100**", 85, "label"),
    ("Score:\n\n85", 85, "lone"),
    ("It is 100% correct.", 100, "lone"),
    ("Score: 85\n\n---\n\n*Note: scores range from 0 to 100.*", 85, "label"),
    ("Score: ~85", 85, "label"),
]

OTHER_SCALES: list[Case] = [
    ("8/10", None, None),
    ("Score: 8/10", None, None),
    ("Score 7 of 10", None, None),
    ("I'd rate it 4 out of 5.", None, None),
    ("Rating: 4/5 stars", None, None),
    ("★★★★☆", None, None),
    ("4 stars", None, None),
    ("⭐⭐⭐", None, None),
    ("On a ten-point scale, this is a 7.", None, None),
    ("On a 10-point scale: 8", None, None),
    ("On a scale of one to ten, 8.", None, None),
    ("Rating (1-5): 4", None, None),
    ("Score: 9 out of ten.", None, None),
    ("I'd give it a solid 3 on a scale of 1 to 5.", None, None),
    ("Score: 17/20", None, None),
    ("Score: 85/100 (8.5/10)", None, None),
    ("On a scale of 10, I give it 8.", None, None),
    ("Score: 8 out of 10, i.e. 80 out of 100.", None, None),
    ("9/10 → 90", None, None),
    ("Grade: 3 out of 4", None, None),
    ("Score: 85 (scale 0-10)", None, None),
    ("**8**/10", None, None),
    ("Rating: 4 (on a 1–5 scale)", None, None),
    ("Score: 85/", None, None),
]

TWO_CANDIDATES: list[Case] = [
    ("Score: 70\n\nOn reflection, Score: 80", None, None),
    ("I'd give it 70 or maybe 80.", None, None),
    ("Score: 85\n\nThe response covers 3 of the 4 key points.", None, None),
    ("I give this a score of 85 out of 100 because it covers 3 points.", None, None),
    ("It gets 2 of the 3 points, so 67.", None, None),
    ("In 2024 this deserves 90.", None, None),
    ("Initial score: 90. Revised score: 70.", None, None),
    ("Score: 80 -> 75", None, None),
    ("I first thought 60, but after checking the facts I'd say 75.", None, None),
    ("The reference answer would get 100, this one gets 55.", None, None),
    ("Reference: 100\nResponse: 62", None, None),
    ("Accuracy: 90\nFluency: 80\nOverall: 85", None, None),
    ("Score: 85. Note that GPT-4 scored 92 on this.", None, None),
    ("Response A: 70, Response B: 85", None, None),
    ("Score: 88\n\nScore: 89", None, None),
    ("A 60 would be harsh; 75 seems right.", None, None),
    ("Score: 40 (the reference scores 100).", None, None),
    ("This response is 20 words long. Score: 60", None, None),
    ("Score: 90 - but only 50 if the tense matters.", None, None),
    ('Score: 70 {"score": 80}', None, None),
    ("I'd say 85... no, 80.", None, None),
    ("Score: 85 (edit: 80)", None, None),
    ("Score: 85 | Reference: 100", None, None),
]

#: One number, but said of something else (or a bound, a count, a condition).
ONE_NUMBER_OF_ANOTHER: list[Case] = [
    ("The reference deserves 100; this response is poor.", None, None),
    ("The reference answer scores 100.", None, None),
    ("Expected output score: 100", None, None),
    ("Originally 90.", None, None),
    ("My initial score was 80, but I need to reconsider.", None, None),
    ("Compared with the ideal answer (100) this falls short.", None, None),
    ("Versus the baseline at 70 it is better.", None, None),
    ("The other response would get 65.", None, None),
    ("The response is correct and well phrased, like the reference, so 95.", None, None),
    ("The reference is perfect, 100.", None, None),
    ("I would have given 90 if it were in passive voice.", None, None),
    ("A perfect answer would get 100.", None, None),
    ("Max score: 100", None, None),
    ("It would be 90 if the tense were right.", None, None),
    ("If it had used the passive voice I'd give 90.", None, None),
    ("Response length: 12 words.", None, None),
    ("Score: >80", None, None),
    ("Score: at least 80", None, None),
    ("Score: 80+", None, None),
]

MALFORMED_JSON: list[Case] = [
    ('{"score": 85, "reason": "Correct but ve', None, None),
    ('{"score": 87', None, None),
    ('{"score": 85,', None, None),
    ('{"score": }', None, None),
    ("{'score': 85}", None, None),
    ("{score: 85}", None, None),
    ('{"score": 85}}', None, None),
    ('{"score": 85} {"score": 90}', None, None),
    ('{"score": 85, "score": 90}', None, None),
    ('{"score": NaN}', None, None),
    ('```json\n{"score": 77, "reason": "Minor errors."', None, None),
    ('{"score": 85 "reason": "missing comma"}', None, None),
    ('[{"score": 85}]', None, None),
    ('{"score": 85}{"score": 90}', None, None),
    ('{"score": [80, 90]}', None, None),
    ("The set {1, 2} is correct. Score: 85", None, None),
]

STRICT_JSON: list[Case] = [
    ('{"score": 150}', None, None),
    ('{"score": -5, "reason": "wrong"}', None, None),
    ('{"score": 85.5}', None, None),
    ('{"score": 85.0}', None, None),
    ('{"score": 1e2}', None, None),
    ('{"score": "high"}', None, None),
    ('{"score": "85/100"}', None, None),
    ('{"score": true}', None, None),
    ('{"score": null}', None, None),
    ('{"reason": "A good answer."}', None, None),
    ('{"evaluation": {"score": 85}}', None, None),
    ('{"score": 80, "reference_score": 100}', None, None),
    ('{"score": 80, "revised_score": 60}', None, None),
    ('{"score": 80, "confidence": 0.9}', None, None),
    ('{"score": 8, "reason": "8/10: good answer"}', None, None),
    ('{"score": 85, "reason": "Score: 90 would be too high, 85 fits."}', None, None),
    ('{"score": 7, "reason": "7 out of 10"}', None, None),
    ('{"score": 4, "reason": "four stars"}', None, None),
    ('Score: 90\n{"score": 85}', None, None),
    ('{"scores": [85]}', None, None),
]

RANGES_AND_NUMBERS: list[Case] = [
    ("Somewhere around 70-80.", None, None),
    ("Between 70 and 80.", None, None),
    ("Score: 70 to 80", None, None),
    ("Score: 75–85", None, None),
    ("It deserves 60 - 70.", None, None),
    ("105", None, None),
    ("-5", None, None),
    ("85.5", None, None),
    ("Score: 150", None, None),
    ("Score: 8.5", None, None),
    ("Score: 85.0", None, None),
    ("Score: -5", None, None),
    ("Score: +85", None, None),
    ("score: 1e2", None, None),
    ("Score: 8.5E1", None, None),
    ("Score: 10^2", None, None),
    ("Score: 10²", None, None),
    ("Score: 8½", None, None),
    ("Rating: 8️⃣", None, None),
    ("Score: 8 (max 10)", None, None),
    ("I revise the score from 85 to 60", None, None),
    ("Score: 0.85", None, None),
    ("Score: 1,000", None, None),
    ("Score: 85pts", None, None),
    ("Score: ８５", None, None),
    ("Score: 85,5", None, None),
]

NO_SCORE: list[Case] = [
    ("I cannot evaluate this response.", None, None),
    ("I'm sorry, but I can't provide a score for this response.", None, None),
    ("eighty", None, None),
    ("Score: eighty-five", None, None),
    ("Score: N/A", None, None),
    ("1. Accuracy: good", None, None),
    ("", None, None),
    ("   \n", None, None),
    (None, None, None),
    ("\x00\ufffd\U0001f600", None, None),
]

CORPUS: list[Case] = [
    *ISSUE_EXAMPLES,
    *PLAIN_JSON,
    *PLAIN_TEXT,
    *OTHER_SCALES,
    *TWO_CANDIDATES,
    *ONE_NUMBER_OF_ANOTHER,
    *MALFORMED_JSON,
    *STRICT_JSON,
    *RANGES_AND_NUMBERS,
    *NO_SCORE,
]


def test_corpus_covers_every_class() -> None:
    assert len(CORPUS) >= 150
    assert len({r for r, _, _ in CORPUS}) == len(CORPUS)  # no duplicates
    parsed = [c for c in CORPUS if c[1] is not None]
    assert len(parsed) >= 60  # plain correct replies that must parse
    assert {rule for _, _, rule in parsed} == {"json", "number", "label", "lone"}


@pytest.mark.parametrize(("reply", "expected", "rule"), CORPUS)
def test_reply_corpus(reply: str | None, expected: int | None, rule: str | None) -> None:
    assert tuple(parse_reply(reply)) == (expected, rule)
    assert parse_score(reply) == expected


def test_reply_schema_asks_for_an_integer_score() -> None:
    import jsonschema

    assert REPLY_SCHEMA["required"] == ["score"]
    assert REPLY_SCHEMA["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 100}
    jsonschema.validate({"score": 85, "reason": "ok"}, REPLY_SCHEMA)
    for bad in ({"score": 101}, {"score": 8.5}, {"reason": "x"}, {"score": 5, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, REPLY_SCHEMA)


def test_the_corpus_through_gptflow_judge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each reply of the corpus given by the stand-in to the real `gptflow judge` path
    (structured output asked for, free text answered): the stored score is the expected
    one, NULL included, the raw reply is kept, and the unparsed count is right."""
    from benchmarks.ollama_stub import OllamaStub
    from flows.cli import main
    from tasks.catalog import Catalog

    replies = [r for r, _, _ in CORPUS if r is not None]
    expected = [e for r, e, _ in CORPUS if r is not None]
    records = [
        {"instruction": f"Task {i}.", "input": "", "output": "ref", "model_response": f"resp-{i}"}
        for i in range(len(replies))
    ]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records), encoding="utf-8")

    def reply(body: dict[str, Any]) -> str:
        content = body["messages"][-1]["content"]
        return replies[int(content.split("model response `resp-")[1].split("`")[0])]

    db = str(tmp_path / "corpus.duckdb")
    with OllamaStub(reply=reply) as stub:
        argv = ["judge", "--responses", str(path), "--host", stub.host, "--no-progress"]
        assert main([*argv, "--run", "corpus", "--db", db, "--concurrency", "8"]) == 0, (
            capsys.readouterr()
        )
    rows = Catalog(db).query_df(
        "SELECT example_id, score, raw_reply FROM judgments WHERE run_id = 'corpus' "
        "ORDER BY example_id"
    )
    got = [None if pd.isna(s) else int(s) for s in rows["score"]]
    wrong = [
        (replies[i], e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g
    ]
    assert wrong == []
    assert rows["raw_reply"].tolist() == replies
    summary = Catalog(db).query_df("SELECT * FROM eval_summary WHERE run_id = 'corpus'").iloc[0]
    assert summary["n_unparsed"] == sum(e is None for e in expected)
    assert summary["n_failed"] == 0
