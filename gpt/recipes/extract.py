"""Responses of an instruction-finetuned model to the test split (the
``extract_responses`` stage, :func:`extract_responses`): greedy decoding with the KV
cache by :func:`gpt.decode.greedy_decode` (drafted tokens verified several per pass, the
same responses as one token per pass), stopping at end-of-text; opt-in int8 weights with
their cost measured; and the reference's JSON export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.args import ExtractArgs
from gpt.device import resolve_device
from gpt.errors import ConfigError
from gpt.fileio import atomic_open
from gpt.recipes.instruct import EOT_ID, check_record, format_prompt

if TYPE_CHECKING:
    from gpt.eval.int8_cost import Int8Cost

__all__ = ["Extraction", "clean_response", "export_responses_json",
           "extract_responses"]  # fmt: skip

log = logging.getLogger(__name__)


def clean_response(text: str) -> str:
    """Generated text -> response: "### Response:" removed, whitespace trimmed."""
    from gpt.prompts import extract_response

    return extract_response(text)


@dataclass
class Extraction:
    """What :func:`extract_responses` produced."""

    rows: list[dict[str, Any]]
    """One per record: ``{example_id, instruction, input, output, response, new_tokens,
    seconds}`` (``seconds``: its share of the decoding time)."""
    decoding: dict[str, Any]
    """:class:`gpt.decode.DecodeStats` as a dict: passes, drafted and accepted tokens,
    acceptance rate (what the speed-up depends on)."""
    int8_cost: Int8Cost | None = None
    """With int8 weights and ``int8_check > 0``: the cost against fp32 weights."""


def extract_responses(
    checkpoint_dir: Path,
    records: Sequence[dict[str, Any]],
    args: ExtractArgs | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
    judge: Any | None = None,
) -> Extraction:
    """Greedy responses (stop at 50256) for each record, decoded by
    :func:`gpt.decode.greedy_decode` (several tokens per pass where drafts match; the
    same responses as one-token decoding). ``example_id`` is the record's ``example_id``
    / ``id`` field, else its position. With ``args.weights = "int8"`` the
    ``args.int8_check`` sample is decoded with fp32 weights too and, when ``judge`` (the
    run's :class:`~gpt.eval.judge.settings.JudgeConfig` or its dict) reaches a judge, the
    differing responses are scored (:mod:`gpt.eval.int8_cost`).
    """
    from tqdm.auto import tqdm

    from gpt.checkpoint import load_checkpoint
    from gpt.decode import greedy_decode
    from gpt.generate import DRAFTS
    from gpt.quantize import with_weights
    from gpt.tokenizer import Tokenizer

    args = args or ExtractArgs()
    loaded = load_checkpoint(Path(checkpoint_dir))
    if getattr(loaded, "kind", "lm") not in (None, "lm"):
        raise ConfigError(
            f"{checkpoint_dir} is a {loaded.kind} checkpoint; response extraction needs an "
            "instruction-finetuned language model"
        )
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    if args.weights != "fp32" and dev.type != "cpu":
        log.warning("int8 weights speed up CPU decoding only; on %s they just cost accuracy", dev)
    decoder = with_weights(model, args.weights)
    tokenizer = (
        Tokenizer.from_dir(loaded.tokenizer_dir) if loaded.tokenizer_dir else Tokenizer.gpt2()
    )
    for i, rec in enumerate(records):
        check_record(rec, i)
    prompts = [
        tokenizer.encode(format_prompt(r["instruction"], r.get("input", "") or "")) for r in records
    ]
    common = {"eos_id": EOT_ID, "draft": DRAFTS[args.draft], "draft_tokens": args.draft_tokens,
              "batch_size": args.batch_size}  # fmt: skip
    with tqdm(total=len(records), desc="responses", disable=not progress) as bar:
        done = greedy_decode(
            decoder, prompts, args.max_new_tokens, on_done=lambda i, t: bar.update(1), **common
        )
    rows = [
        {
            "example_id": rec.get("example_id", rec.get("id", i)),
            "instruction": rec["instruction"],
            "input": rec.get("input", "") or "",
            "output": rec.get("output", "") or "",
            "response": clean_response(tokenizer.decode(new)),
            "new_tokens": len(new),
            "seconds": sec,
        }
        for i, (rec, new, sec) in enumerate(zip(records, done.tokens, done.seconds, strict=True))
    ]
    stats = done.stats.to_dict()
    log.info(
        "responses: %d new tokens in %d passes, %s of drafted tokens accepted",
        stats["new_tokens"], stats["passes"],
        "none" if stats["acceptance_rate"] is None else f"{100 * stats['acceptance_rate']:.0f} %",
    )  # fmt: skip
    cost = None
    if args.weights == "int8" and args.int8_check > 0 and records:
        from gpt.eval.int8_cost import measure_int8_cost

        cost = measure_int8_cost(
            records,
            done.tokens,
            [r["response"] for r in rows],
            sample=args.int8_check,
            fp32=lambda idx: (
                greedy_decode(
                    model, [prompts[i] for i in idx], args.max_new_tokens, **common
                ).tokens
            ),
            to_response=lambda new: clean_response(tokenizer.decode(new)),
            judge=judge,
        )
        log.info("%s", cost.summary())
    return Extraction(rows=rows, decoding=stats, int8_cost=cost)


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
