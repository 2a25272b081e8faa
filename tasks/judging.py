"""Catalog glue for the judge: responses in, judgments out (no Prefect needed).

- :func:`import_responses` — validate a JSON list of responses and store it as ``responses``.
- :func:`judge_run` — score a run's responses with each judge model and repeat, resuming
  where an earlier call stopped.
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
JUDGMENT_KEY = ["run_id", "example_id", "judge_model", "prompt_version", "repeat"]


@dataclass
class JudgeSummary:
    """What one :func:`judge_run` call did, plus the run's ``eval_summary`` rows.

    The counts are of judgments: one per example, judge model and repeat.
    """

    run_id: str
    """Run whose responses were judged."""
    judge_models: list[str]
    """Ollama models used."""
    prompt_version: str
    """Scoring prompt version used."""
    repeats: int
    """Judgments per example and model."""
    hosts: list[str]
    """Ollama servers configured."""
    n_responses: int
    """Responses stored for the run."""
    n_skipped: int
    """Already judged (without error) by this model + prompt version + repeat: not sent."""
    n_sent: int
    """Sent to the judges in this call."""
    n_scored: int
    """Of those sent, replies holding a valid 0..100 score."""
    n_unparsed: int
    """Of those sent, replies without a valid score (NULL score, raw reply kept)."""
    n_failed: int
    """Of those sent, requests that failed after all retries (error recorded)."""
    seconds: float
    """Wall time of this call."""
    hosts_down: list[str] = field(default_factory=list)
    """``url: why`` of each host found down by the preflight or taken out of rotation."""
    summary: list[dict[str, Any]] = field(default_factory=list)
    """The ``eval_summary`` rows of (run, each judge model, prompt version) after this call."""
    agreement: list[dict[str, Any]] = field(default_factory=list)
    """The ``judge_agreement`` rows between these judge models (two or more models)."""


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


def _plain(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-able dicts (numpy scalars unwrapped, NULL/NaN as ``None``)."""
    return [
        {k: None if _isna(v) else (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]


def _pending(
    catalog: Catalog, run_id: str, responses: list[dict[str, Any]], cfg: JudgeConfig
) -> set[tuple[int, str, int]]:
    """(example_id, model, repeat) not yet judged without error."""
    done = catalog.query_df(
        'SELECT example_id, judge_model, "repeat" FROM judgments '
        "WHERE run_id = ? AND prompt_version = ? AND error IS NULL",
        [run_id, PROMPT_VERSION],
    )
    judged = {
        (int(e), str(m), int(r))
        for e, m, r in zip(done["example_id"], done["judge_model"], done["repeat"], strict=True)
    }
    wanted = {
        (int(r["example_id"]), model, rep)
        for r in responses
        for model in cfg.models
        for rep in range(cfg.repeats)
    }
    return wanted - judged


def judge_run(
    catalog: Catalog,
    run_id: str,
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    save_every: int = 16,
) -> JudgeSummary:
    """Score the run's responses with each of ``cfg.models``, ``cfg.repeats`` times, at
    :data:`PROMPT_VERSION`, sending only what is not judged yet.

    Judgments free of ``error`` are kept (a rerun sends only what is missing or failed;
    raising ``repeats`` or adding a model sends only the new judgments). Preflight runs
    before any request, so no reachable host or a model on no host raises
    :class:`~gpt.errors.JudgeError` with the stored responses left untouched; hosts that
    are down are left out. Judgments are upserted by (run_id, example_id, judge_model,
    prompt_version, repeat) every ``save_every`` results, so an interrupted call loses
    at most that many.
    """
    start = time.perf_counter()
    responses = _load_responses(catalog, run_id)
    if not responses:
        raise DataError(
            f"run {run_id!r} has no responses in the catalog {catalog.location} — run the "
            "response-extraction stage or `gptflow judge --responses FILE.json` first"
        )
    pending = _pending(catalog, run_id, responses, cfg)
    n_wanted = len(responses) * len(cfg.models) * cfg.repeats
    log.info(
        "judge %s: %d responses x %d model(s) x %d repeat(s), %d already judged (%s), %d to send",
        run_id,
        len(responses),
        len(cfg.models),
        cfg.repeats,
        n_wanted - len(pending),
        PROMPT_VERSION,
        len(pending),
    )
    judgments: list[Judgment] = []
    hosts_down: list[str] = []
    if pending:
        statuses = preflight(cfg, progress=progress)
        hosts_down += [f"{s.url}: {s.error}" for s in statuses if not s.up]
        routes = {s.url: s.models for s in statuses if s.up}
        buffer: list[Judgment] = []

        def flush() -> None:
            if buffer:
                rows = [{"run_id": run_id, **j.as_row()} for j in buffer]
                catalog.upsert_rows("judgments", rows, key=JUDGMENT_KEY)
                buffer.clear()

        def on_result(judgment: Judgment) -> None:
            # Save as we go so an interrupted run resumes where it stopped.
            buffer.append(judgment)
            if len(buffer) >= save_every:
                flush()

        pending_ids = {eid for eid, _, _ in pending}
        todo = [r for r in responses if r["example_id"] in pending_ids]
        try:
            judgments = score_examples(
                todo,
                cfg,
                progress=progress,
                on_result=on_result,
                pending=pending,
                routes=routes,
                hosts_down=hosts_down,
            )
        finally:
            flush()
    n_failed = sum(j.error is not None for j in judgments)
    n_scored = sum(j.score is not None for j in judgments)
    rows = summarize(catalog, run_id)
    rows = rows[rows["judge_model"].isin(cfg.models) & (rows["prompt_version"] == PROMPT_VERSION)]
    agreement = catalog.query_df(
        "SELECT * FROM judge_agreement WHERE run_id = ? AND prompt_version = ? "
        "ORDER BY judge_a, judge_b",
        [run_id, PROMPT_VERSION],
    )
    agreement = agreement[
        agreement["judge_a"].isin(cfg.models) & agreement["judge_b"].isin(cfg.models)
    ]
    return JudgeSummary(
        run_id=run_id,
        judge_models=list(cfg.models),
        prompt_version=PROMPT_VERSION,
        repeats=cfg.repeats,
        hosts=list(cfg.hosts),
        n_responses=len(responses),
        n_skipped=n_wanted - len(pending),
        n_sent=len(pending),
        n_scored=n_scored,
        n_unparsed=len(judgments) - n_scored - n_failed,
        n_failed=n_failed,
        seconds=time.perf_counter() - start,
        hosts_down=hosts_down,
        summary=_plain(rows),
        agreement=_plain(agreement),
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
