"""Responses of an instruction-finetuned model to the test split (the
``extract_responses`` stage, :func:`extract_responses`): greedy decoding with the KV
cache, prompts batched, stopping at end-of-text; and the reference's JSON export.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.args import ExtractArgs
from gpt.device import resolve_device
from gpt.errors import ConfigError
from gpt.fileio import atomic_open
from gpt.recipes.instruct import EOT_ID, check_record, format_prompt


def clean_response(text: str) -> str:
    """Generated text -> response: "### Response:" removed, whitespace trimmed."""
    from gpt.prompts import extract_response

    return extract_response(text)


def extract_responses(
    checkpoint_dir: Path,
    records: Sequence[dict[str, Any]],
    args: ExtractArgs | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy responses (KV cache, batched, stop at 50256) for each record.

    Rows: ``{example_id, instruction, input, output, response, new_tokens, seconds}``
    (``seconds``: the batch's generation time divided by its size). ``example_id`` is the
    record's ``example_id`` / ``id`` field, else its position.
    """
    from tqdm.auto import tqdm

    from gpt.checkpoint import load_checkpoint
    from gpt.generate import generate
    from gpt.tokenizer import Tokenizer

    args = args or ExtractArgs()
    loaded = load_checkpoint(Path(checkpoint_dir))
    if getattr(loaded, "kind", "lm") not in (None, "lm"):
        raise ConfigError(
            f"{checkpoint_dir} is a {loaded.kind} checkpoint; response extraction needs an "
            "instruction-finetuned language model"
        )
    model = loaded.model.to(resolve_device(device))
    model.eval()
    tokenizer = (
        Tokenizer.from_dir(loaded.tokenizer_dir) if loaded.tokenizer_dir else Tokenizer.gpt2()
    )
    for i, rec in enumerate(records):
        check_record(rec, i)
    prompts = [
        tokenizer.encode(format_prompt(r["instruction"], r.get("input", "") or "")) for r in records
    ]
    rows: list[dict[str, Any]] = []
    step = args.batch_size
    bar = tqdm(range(0, len(records), step), desc="responses", disable=not progress)
    for s in bar:
        chunk = list(range(s, min(s + step, len(records))))
        t0 = time.perf_counter()
        outs = generate(model, [prompts[i] for i in chunk], args.max_new_tokens, eos_id=EOT_ID)
        per = (time.perf_counter() - t0) / len(chunk)
        for i, new in zip(chunk, outs, strict=True):
            rec = records[i]
            rows.append(
                {
                    "example_id": rec.get("example_id", rec.get("id", i)),
                    "instruction": rec["instruction"],
                    "input": rec.get("input", "") or "",
                    "output": rec.get("output", "") or "",
                    "response": clean_response(tokenizer.decode(new)),
                    "new_tokens": len(new),
                    "seconds": per,
                }
            )
    return rows


def export_responses_json(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write rows as the reference's JSON list of {instruction, input, output,
    model_response} (atomic: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [
        {
            "instruction": r["instruction"],
            "input": r.get("input", ""),
            "output": r.get("output", ""),
            "model_response": r["response"],
        }
        for r in rows
    ]
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=4, ensure_ascii=False, sort_keys=True)
    return path
