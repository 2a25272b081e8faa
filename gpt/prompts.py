"""Prompt templates (the Alpaca format used for instruction finetuning)."""

from __future__ import annotations

__all__ = ["ALPACA_PREAMBLE", "RESPONSE_HEADER", "extract_response", "format_alpaca"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"
_MARKER = "### Response:"


def format_alpaca(
    instruction: str,
    input: str = "",
    output: str | None = None,
    *,
    with_response_header: bool = False,
) -> str:
    """The Alpaca prompt: preamble, ``### Instruction:``, ``### Input:`` (only when
    ``input`` is non-empty), then ``\\n\\n### Response:\\n`` + ``output`` when ``output`` is
    given. With ``output=None`` the text ends after the instruction/input, as the
    reference prompts at inference time (the model writes the response header itself);
    ``with_response_header=True`` appends the bare header instead."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    if output is not None:
        text += RESPONSE_HEADER + output
    elif with_response_header:
        text += RESPONSE_HEADER
    return text


def extract_response(generated: str) -> str:
    """The response in text generated after an Alpaca prompt: ``### Response:`` removed,
    surrounding whitespace stripped (as the reference does)."""
    return generated.replace(_MARKER, "").strip()
