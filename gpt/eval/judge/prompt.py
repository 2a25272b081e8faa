"""What the judge is asked: the versioned scoring prompt and the JSON schema of its reply.

Both are part of the judge key (:meth:`gpt.eval.judge.settings.JudgeConfig.judge_key`)
through their digests, so any change to the text sent — the template, the Alpaca
formatting of the instruction, the schema — makes new judgments instead of mixing with
the old ones, even when :data:`PROMPT_VERSION` was not bumped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gpt.prompts import format_alpaca

__all__ = [
    "PROMPT_TEMPLATE",
    "PROMPT_VERSION",
    "REPLY_SCHEMA",
    "build_prompt",
    "prompt_digest",
    "schema_digest",
]

#: Human-readable version of :data:`PROMPT_TEMPLATE`, stored with every score. Bump it
#: when the template changes (the judge key changes on its own, through
#: :func:`prompt_digest`; the version is for people reading the tables).
PROMPT_VERSION = "v2"

#: The scoring prompt. ``{prompt}`` is the Alpaca-formatted instruction (+ input),
#: ``{output}`` the reference answer, ``{response}`` the model's answer.
PROMPT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, "
    "where 100 is the best score. "
    'Answer with a JSON object: {{"score": <integer from 0 to 100>, '
    '"reason": "<one short sentence>"}}.'
)

#: JSON schema of the reply, sent as Ollama's ``format`` (structured output).
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "reason": {"type": "string", "maxLength": 300},
    },
    "required": ["score"],
    "additionalProperties": False,
}


def build_prompt(instruction: str, input_text: str, output: str, response: str) -> str:
    """The scoring prompt for one example."""
    return PROMPT_TEMPLATE.format(
        prompt=format_alpaca(instruction, input_text or ""),
        output=output,
        response=response,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_digest() -> str:
    """sha256 of the prompt as sent, with markers in place of an example's texts (with and
    without an input): it changes with the template and with the Alpaca formatting."""
    marks = ("\x00instruction\x00", "\x00input\x00", "\x00output\x00", "\x00response\x00")
    with_input = build_prompt(*marks)
    without = build_prompt(marks[0], "", marks[2], marks[3])
    return _sha256(with_input + "\x00\x00" + without)


def schema_digest() -> str:
    """sha256 of :data:`REPLY_SCHEMA` as sent (canonical JSON)."""
    return _sha256(json.dumps(REPLY_SCHEMA, sort_keys=True, separators=(",", ":")))
