"""Catalog glue for the judge: responses in, judgments out (no Prefect needed).

- :func:`import_responses` — validate a JSON list of responses and store it as ``responses``.
- :func:`judge_run` — score a run's responses, resuming where an earlier call stopped.
- :func:`summarize` — the run's ``eval_summary`` rows.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import DataError
from gpt.eval.judge import PROMPT_VERSION, JudgeConfig, Judgment, preflight, score_examples

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog import Catalog

log = logging.getLogger(__name__)

#: Key of one row in ``judgments``.
JUDGMENT_KEY = ["run_id", "example_id", "judge_model", "prompt_version"]


@dataclass
class JudgeSummary:
    """What one :func:`judge_run` call did, plus the run's ``eval_summary`` row."""

    run_id: str
    """Run whose responses were judged."""
    judge_model: str
    """Ollama model used."""
    prompt_version: str
    """Scoring prompt version used."""
    n_responses: int
    """Responses stored for the run."""
    n_skipped: int
    """Already judged (without error) by this judge + prompt version: not sent again."""
    n_sent: int
    """Sent to the judge in this call."""
    n_scored: int
    """Of those sent, replies holding a valid 0..100 score."""
    n_unparsed: int
    """Of those sent, replies without a valid score (NULL score, raw reply kept)."""
    n_failed: int
    """Of those sent, requests that failed after all retries (error recorded)."""
    seconds: float
    """Wall time of this call."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The ``eval_summary`` row for (run, judge, prompt version) after this call."""


def _load_responses(catalog: Catalog, run_id: str) -> list[dict[str, Any]]:
    df = catalog.query_df(
        "SELECT example_id, instruction, input, output, response FROM responses "
        "WHERE run_id = ? ORDER BY example_id",
        [run_id],
    )
    return [{k: (None if _isna(v) else v) for k, v in row.items()} for row in df.to_dict("records")]


def _isna(v: Any) -> bool:
    """NULL as pandas returns it (None, NaN, NA, NaT); False for non-scalars."""
    import pandas as pd

    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def judge_run(
    catalog: Catalog,
    run_id: str,
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    save_every: int = 16,
) -> JudgeSummary:
    """Score the run's responses not yet judged by ``cfg.model`` + :data:`PROMPT_VERSION`.

    Examples with a judgment free of ``error`` are skipped (a rerun sends only what is
    missing or failed). Preflight runs before any request, so an unreachable server or a
    missing model raises :class:`~gpt.errors.JudgeError` with the stored responses left
    untouched. Judgments are upserted by (run_id, example_id, judge_model, prompt_version)
    every ``save_every`` results, so an interrupted call loses at most that many.
    """
    start = time.perf_counter()
    responses = _load_responses(catalog, run_id)
    if not responses:
        raise DataError(
            f"run {run_id!r} has no responses in the catalog {catalog.path} — run the "
            "response-extraction stage or `gptflow judge --responses FILE.json` first"
        )
    done = catalog.query_df(
        "SELECT example_id FROM judgments WHERE run_id = ? AND judge_model = ? "
        "AND prompt_version = ? AND error IS NULL",
        [run_id, cfg.model, PROMPT_VERSION],
    )
    done_ids = {int(i) for i in done["example_id"]}
    todo = [r for r in responses if int(r["example_id"]) not in done_ids]
    log.info(
        "judge %s: %d responses, %d already judged by %s/%s, %d to send",
        run_id,
        len(responses),
        len(responses) - len(todo),
        cfg.model,
        PROMPT_VERSION,
        len(todo),
    )
    judgments: list[Judgment] = []
    if todo:
        preflight(cfg, progress=progress)
        pending: list[Judgment] = []

        def flush() -> None:
            if pending:
                rows = [{"run_id": run_id, **j.as_row()} for j in pending]
                catalog.upsert_rows("judgments", rows, key=JUDGMENT_KEY)
                pending.clear()

        def on_result(judgment: Judgment) -> None:
            # Save as we go so an interrupted run resumes where it stopped.
            pending.append(judgment)
            if len(pending) >= save_every:
                flush()

        try:
            judgments = score_examples(todo, cfg, progress=progress, on_result=on_result)
        finally:
            flush()
    n_failed = sum(j.error is not None for j in judgments)
    n_scored = sum(j.score is not None for j in judgments)
    rows = summarize(catalog, run_id)
    rows = rows[(rows["judge_model"] == cfg.model) & (rows["prompt_version"] == PROMPT_VERSION)]
    summary = {k: (None if _isna(v) else v) for k, v in rows.iloc[0].items()} if len(rows) else {}
    return JudgeSummary(
        run_id=run_id,
        judge_model=cfg.model,
        prompt_version=PROMPT_VERSION,
        n_responses=len(responses),
        n_skipped=len(responses) - len(todo),
        n_sent=len(todo),
        n_scored=n_scored,
        n_unparsed=len(judgments) - n_scored - n_failed,
        n_failed=n_failed,
        seconds=time.perf_counter() - start,
        summary=summary,
    )


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
    return records


def import_responses(
    catalog: Catalog,
    run_id: str,
    json_path: str | Path,
    response_key: str = "model_response",
) -> int:
    """Store the responses in ``json_path`` (a list of objects with ``instruction``,
    ``input`` (may be absent or empty), ``output`` and ``response_key``) as the run's
    ``responses``; ``example_id`` is the record's index in the list.

    Raises :class:`~gpt.errors.DataError` naming the file, record index and field.
    Re-importing replaces the run's responses; judgments of examples whose text changed
    are deleted (they no longer judge what is stored). Returns the number of rows.
    """
    json_path = Path(json_path)
    records = _read_records(json_path)
    if not records:
        raise DataError(f"{json_path} holds an empty list — nothing to judge")
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        where = f"{json_path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where} is a {type(rec).__name__}, expected an object")
        row: dict[str, Any] = {"run_id": run_id, "example_id": i}
        for name, key, optional in (
            ("instruction", "instruction", False),
            ("input", "input", True),
            ("output", "output", False),
            ("response", response_key, False),
        ):
            if key not in rec or rec[key] is None:
                if optional:
                    row[name] = ""
                    continue
                hint = (
                    f"; its fields are {sorted(rec)} (use --response-key to pick the "
                    "response field)"
                    if name == "response"
                    else f"; its fields are {sorted(rec)}"
                )
                raise DataError(f"{where}: field {key!r} is missing{hint}")
            if not isinstance(rec[key], str):
                raise DataError(
                    f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}"
                )
            row[name] = rec[key]
        rows.append(row)

    catalog.migrate()  # the catalog may not exist yet
    old = _load_responses(catalog, run_id)
    stale = _changed_ids(old, rows)
    if stale:  # drop their judgments first: a crash in between never leaves stale scores
        with catalog.connect() as con:
            placeholders = ", ".join("?" for _ in stale)
            con.execute(
                f"DELETE FROM judgments WHERE run_id = ? AND example_id IN ({placeholders})",
                [run_id, *stale],
            )
        log.info("run %s: %d responses changed; their judgments were dropped", run_id, len(stale))
    catalog.replace_rows("responses", rows, where={"run_id": run_id})
    log.info("run %s: stored %d responses from %s", run_id, len(rows), json_path)
    return len(rows)


def _changed_ids(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[int]:
    """Example ids whose stored text differs from (or is missing in) the new rows."""
    fields = ("instruction", "input", "output", "response")
    new_by_id = {r["example_id"]: tuple(r[f] for f in fields) for r in new}
    changed = []
    for r in old:
        eid = int(r["example_id"])
        if new_by_id.get(eid) != tuple(r[f] for f in fields):
            changed.append(eid)
    return changed


def summarize(catalog: Catalog, run_id: str | None = None) -> pd.DataFrame:
    """``eval_summary`` rows for ``run_id`` (every run when ``None``)."""
    if run_id is None:
        return catalog.query_df(
            "SELECT * FROM eval_summary ORDER BY run_id, judge_model, prompt_version"
        )
    return catalog.query_df(
        "SELECT * FROM eval_summary WHERE run_id = ? ORDER BY judge_model, prompt_version",
        [run_id],
    )
