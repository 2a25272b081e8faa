"""Responses to judge, read from a JSON file (``gptflow judge --responses FILE.json``).

The file is a list of objects with ``instruction``, ``input`` (may be absent or empty),
``output`` (the reference answer) and a response field (``model_response`` by default,
as the book's scripts write it). Every record is checked before anything is stored; a
bad one raises :class:`~gpt.errors.DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.errors import DataError

__all__ = ["RESPONSE_FIELDS", "changed_examples", "read_responses"]

#: The text fields of one response, as the ``responses`` table names them.
RESPONSE_FIELDS = ("instruction", "input", "output", "response")


def _read_records(json_path: Path) -> list[Any]:
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"responses file {json_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read responses file {json_path}: {exc}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{json_path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(records, list):
        raise DataError(
            f"{json_path} must hold a JSON list of objects with instruction, input, output "
            f"and a response field; found a {type(records).__name__}"
        )
    if not records:
        raise DataError(f"{json_path} holds an empty list — nothing to judge")
    return records


def read_responses(
    json_path: str | Path, response_key: str = "model_response"
) -> list[dict[str, Any]]:
    """The records of ``json_path`` as rows: ``example_id`` (the record's index) and
    :data:`RESPONSE_FIELDS` (``response`` read from ``response_key``)."""
    json_path = Path(json_path)
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(_read_records(json_path)):
        where = f"{json_path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where} is a {type(rec).__name__}, expected an object")
        row: dict[str, Any] = {"example_id": i}
        for name in RESPONSE_FIELDS:
            key = response_key if name == "response" else name
            if key not in rec or rec[key] is None:
                if name == "input":
                    row[name] = ""
                    continue
                hint = (
                    " (use --response-key to pick the response field)" if name == "response" else ""
                )
                raise DataError(
                    f"{where}: field {key!r} is missing; its fields are {sorted(rec)}{hint}"
                )
            if not isinstance(rec[key], str):
                raise DataError(
                    f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}"
                )
            row[name] = rec[key]
        rows.append(row)
    return rows


def changed_examples(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[int]:
    """Example ids of ``old`` whose text differs from (or is missing in) ``new``."""
    new_by_id = {r["example_id"]: tuple(r[f] for f in RESPONSE_FIELDS) for r in new}
    return [
        int(r["example_id"])
        for r in old
        if new_by_id.get(int(r["example_id"])) != tuple(r[f] for f in RESPONSE_FIELDS)
    ]
