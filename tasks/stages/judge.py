"""judge: score a run's responses with the Ollama judges, each judgment under its judge key.

The pipeline (responses of its extract_responses stage), the ``gptflow-judge`` flow and
``gptflow judge`` (responses already in the catalog) run this same stage.

- **Its cache key** covers the responses' content and every setting in the judge key
  except the model digests, which only the servers know: on a cache hit the digests
  are asked for again, and a model pulled anew since (same tag, new digest) makes the
  stage compute again rather than serve scores of the old model. A server that does
  not answer leaves the cached result served (with a warning).
- **Each judgment row** carries its judge key (:meth:`JudgeConfig.judge_key`): model and
  digest, prompt, schema, sampling options, structured output, reader version.
  Judging resumes only within one key: rows of other settings are never counted as
  done, and stay in ``judgments`` for querying. A reply stored under the same reply
  settings but another reader version or number of repeats is reused (read again by
  today's reader) instead of asked for again.
- **What a run shows**: the stage's outputs name the judge key of each model
  (``judge_keys``); the catalog's views (``eval_summary``, ``eval_examples``,
  ``judge_spread``, ``judge_agreement``) show each run the rows of the keys its own
  judge stage used, so a run's outputs and the catalog never disagree.
- A result is committed only when every request got an answer; otherwise the stage
  says how many failed and a rerun sends only those. With ``required`` false an
  unavailable judge ends the stage ``skipped`` with the fix recorded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import DataError, JudgeError
from gpt.eval.judge.hosts import preflight, route
from gpt.eval.judge.prompt import PROMPT_VERSION
from gpt.eval.judge.reply import parse_reply
from gpt.eval.judge.responses import RESPONSE_FIELDS, changed_examples, read_responses
from gpt.eval.judge.scoring import Judgment, score_examples
from gpt.eval.judge.settings import JudgeConfig, JudgeKey, judge_fix
from tasks.jsonable import plain_rows
from tasks.records.rows import ROW_KEYS
from tasks.stages.contract import (
    StageIncomplete,
    StageOut,
    StageOutput,
    StageRun,
    StageSkipped,
    logger,
)
from tasks.stages.runner import stage
from tasks.store.keys import stable_json

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog import Catalog

log = logging.getLogger(__name__)


class JudgeOut(StageOut):
    """What the judge did for one run's responses (the stage's result, and what
    :func:`judge_run` returns). Counts are of judgments: one per example, model, repeat."""

    responses_run_id: str
    """Run whose responses were judged (its ``judgments`` rows hold the scores)."""
    judge_models: list[str]
    """Ollama models used."""
    prompt_version: str
    """Scoring prompt version used."""
    repeats: int
    """Judgments per example and model."""
    judge_keys: dict[str, str]
    """Each model's judge key: the ``judgments`` rows this result is made of."""
    model_digests: dict[str, str]
    """Each model's digest as the servers reported it."""
    n_responses: int
    """Responses stored for the run."""
    n_skipped: int
    """Already judged (without error) under the same judge key: not sent."""
    n_reused: int
    """Replies stored under another judge key with the same reply settings (another
    reader version or number of repeats), read again and stored under this key: not sent."""
    n_sent: int
    """Sent to the judges in this call."""
    n_scored: int
    """Of those sent, replies holding a valid 0..100 score."""
    n_unparsed: int
    """Of those sent, replies without a valid score (NULL score, raw reply kept)."""
    n_failed: int
    """Of those sent, requests that failed after all retries (error recorded)."""
    summary: list[dict[str, Any]]
    """The ``judge_key_summary`` rows of these keys (what ``eval_summary`` shows for a
    run whose judge stage gave this result), one per judge model."""
    hosts_down: list[str]
    """``url: why`` of each server found down, taken out of rotation, or left out for
    holding another digest of a model."""


# --------------------------------------------------------------------------- responses


def _in(values: list[Any]) -> str:
    """Placeholders for an ``IN (…)`` list of ``values``."""
    return ", ".join("?" for _ in values)


def _load_responses(catalog: Catalog, run_id: str, *, required: bool = True) -> list[dict]:
    """The run's ``responses`` rows; with ``required``, a DataError naming the fix when
    there are none."""
    df = catalog.query_df(
        f"SELECT example_id, {', '.join(RESPONSE_FIELDS)} FROM responses "
        "WHERE run_id = ? ORDER BY example_id",
        [run_id],
    )
    if required and df.empty:
        raise DataError(
            f"run {run_id!r} has no responses in the catalog {catalog.location} — run the "
            "response-extraction stage or `gptflow judge --responses FILE.json` first"
        )
    return plain_rows(df)


def responses_input(catalog: Catalog, run_id: str) -> StageOutput:
    """The responses a run holds in the catalog, as the judge stage's input (its digest
    hashes the run and their text, so re-imported, changed responses get a new key)."""
    rows = _load_responses(catalog, run_id)
    # judgments belong to a run's responses: the run is part of what is judged
    digest = hashlib.sha256(stable_json({"run_id": run_id, "rows": rows}).encode()).hexdigest()
    return StageOutput(
        stage="extract_responses", key="catalog", root="", run_id=run_id, digest=digest
    )


def import_responses(
    catalog: Catalog,
    run_id: str,
    json_path: str | Path,
    response_key: str = "model_response",
) -> int:
    """Store the responses in ``json_path`` (:func:`~gpt.eval.judge.responses.read_responses`)
    as the run's ``responses``; returns the number of rows.

    Re-importing replaces the run's responses; judgments of examples whose text changed
    are deleted first (they no longer judge what is stored, and a crash in between never
    leaves them).
    """
    rows = [{"run_id": run_id, **r} for r in read_responses(json_path, response_key)]
    catalog.migrate()  # the catalog may not exist yet
    stale = changed_examples(_load_responses(catalog, run_id, required=False), rows)
    if stale:
        with catalog.connect() as con:
            con.execute(
                f"DELETE FROM judgments WHERE run_id = ? AND example_id IN ({_in(stale)})",
                [run_id, *stale],
            )
        log.info("run %s: %d responses changed; their judgments were dropped", run_id, len(stale))
    catalog.replace_rows("responses", rows, where={"run_id": run_id})
    log.info("run %s: stored %d responses from %s", run_id, len(rows), json_path)
    return len(rows)


# --------------------------------------------------------------------------- judging


def _judgment_row(run_id: str, jk: JudgeKey, row: dict[str, Any]) -> dict[str, Any]:
    """A ``judgments`` row: the judgment's columns and its judge key's."""
    return {
        "run_id": run_id,
        **row,
        "judge_key": jk.key,
        "reply_key": jk.reply_key,
        "judge_settings": jk.settings,
    }


def _reuse(
    catalog: Catalog, run_id: str, keys: dict[str, JudgeKey], wanted: set[tuple[int, str, int]]
) -> dict[tuple[int, str, int], dict[str, Any]]:
    """Rows for the items of ``wanted`` whose reply is stored under another judge key with
    the same reply key: the stored reply, read by today's reader, under this key."""
    by_reply = {jk.reply_key: jk for jk in keys.values()}
    current = [jk.key for jk in keys.values()]
    df = catalog.query_df(
        "SELECT * EXCLUDE (run_id, judge_key, reply_key, judge_settings), reply_key "
        f"FROM judgments WHERE run_id = ? AND reply_key IN ({_in(list(by_reply))}) "
        f"AND judge_key NOT IN ({_in(current)}) AND error IS NULL AND raw_reply IS NOT NULL "
        "ORDER BY judged_at",
        [run_id, *by_reply, *current],
    )
    out: dict[tuple[int, str, int], dict[str, Any]] = {}
    for row in plain_rows(df):
        jk = by_reply[row.pop("reply_key")]
        item = (int(row["example_id"]), jk.model, int(row["repeat"]))
        if item in wanted:
            parsed = parse_reply(row["raw_reply"])
            row.update(score=parsed.score, parse_rule=parsed.rule, judge_model=jk.model)
            out[item] = _judgment_row(run_id, jk, row)
    return out


def judge_run(
    catalog: Catalog,
    run_id: str,
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    save_every: int = 16,
    again: bool = False,
) -> JudgeOut:
    """Score the run's responses with each of ``cfg.models``, ``cfg.repeats`` times,
    sending only what is not judged yet under the same judge key.

    The preflight runs first: it finds the live hosts and each model's digest (so the
    judge keys), and raises :class:`~gpt.errors.JudgeError` — with the stored responses
    left untouched — when no host answers or a model is on none. Judgments free of
    ``error`` under the same key are kept, and replies stored under the same reply
    settings are reused (raising ``repeats`` or adding a model sends only the new
    ones); ``again`` deletes this key's judgments and scores everything
    again. Judgments are upserted every ``save_every`` results, so an interrupted call
    loses at most that many.
    """
    responses = _load_responses(catalog, run_id)
    statuses = preflight(cfg, progress=progress)
    routing = route(statuses, cfg.models)
    hosts_down = [f"{s.url}: {s.error}" for s in statuses if not s.up] + routing.left_out
    keys = {m: cfg.judge_key(m, routing.digests[m]) for m in cfg.models}
    key_of = {jk.key: jk for jk in keys.values()}
    row_key = list(ROW_KEYS["judgments"])
    if again:
        with catalog.connect() as con:
            con.execute(
                f"DELETE FROM judgments WHERE run_id = ? AND judge_key IN ({_in(list(key_of))})",
                [run_id, *key_of],
            )
    done = catalog.query_df(
        'SELECT example_id, judge_key, "repeat" FROM judgments '
        f"WHERE run_id = ? AND judge_key IN ({_in(list(key_of))}) AND error IS NULL",
        [run_id, *key_of],
    )
    wanted = {
        (int(r["example_id"]), model, rep)
        for r in responses
        for model in cfg.models
        for rep in range(cfg.repeats)
    }
    judged = wanted & {
        (int(e), key_of[k].model, int(r))
        for e, k, r in zip(done["example_id"], done["judge_key"], done["repeat"], strict=True)
    }
    reused = _reuse(catalog, run_id, keys, wanted - judged) if not again else {}
    if reused:
        catalog.upsert_rows("judgments", list(reused.values()), key=row_key)
    pending = wanted - judged - set(reused)
    log.info(
        "judge %s: %d responses x %d model(s) x %d repeat(s): %d already judged, %d reused, "
        "%d to send",
        run_id, len(responses), len(cfg.models), cfg.repeats, len(judged), len(reused),
        len(pending),
    )  # fmt: skip
    judgments: list[Judgment] = []
    if pending:
        buffer: list[Judgment] = []

        def flush() -> None:
            if buffer:
                rows = [_judgment_row(run_id, keys[j.judge_model], j.as_row()) for j in buffer]
                catalog.upsert_rows("judgments", rows, key=row_key)
                buffer.clear()

        def on_result(judgment: Judgment) -> None:
            # Save as we go so an interrupted run resumes where it stopped.
            buffer.append(judgment)
            if len(buffer) >= save_every:
                flush()

        pending_ids = {eid for eid, _, _ in pending}
        try:
            judgments = score_examples(
                [r for r in responses if r["example_id"] in pending_ids],
                cfg,
                progress=progress,
                on_result=on_result,
                pending=pending,
                routes=routing.routes,
                hosts_down=hosts_down,
            )
        finally:
            flush()
    n_failed = sum(j.error is not None for j in judgments)
    n_scored = sum(j.score is not None for j in judgments)
    summary = catalog.query_df(
        f"SELECT * FROM judge_key_summary WHERE run_id = ? AND judge_key IN ({_in(list(key_of))}) "
        "ORDER BY judge_model",
        [run_id, *key_of],
    )
    return JudgeOut(
        responses_run_id=run_id,
        judge_models=list(cfg.models),
        prompt_version=PROMPT_VERSION,
        repeats=cfg.repeats,
        judge_keys={m: jk.key for m, jk in keys.items()},
        model_digests=dict(routing.digests),
        n_responses=len(responses),
        n_skipped=len(judged),
        n_reused=len(reused),
        n_sent=len(pending),
        n_scored=n_scored,
        n_unparsed=len(judgments) - n_scored - n_failed,
        n_failed=n_failed,
        summary=plain_rows(summary),
        hosts_down=hosts_down,
    )


def summarize(catalog: Catalog, run_id: str | None = None) -> pd.DataFrame:
    """``eval_summary`` rows for ``run_id`` (every run when ``None``)."""
    where, params = ("WHERE run_id = ? ", [run_id]) if run_id is not None else ("", [])
    return catalog.query_df(
        f"SELECT * FROM eval_summary {where}ORDER BY run_id, judge_model, prompt_version", params
    )


# --------------------------------------------------------------------------- the stage


def _short(digest: str | None) -> str:
    return (digest or "none").removeprefix("sha256:")[:12]


def models_changed(args: JudgeConfig, out: JudgeOut) -> str | None:
    """Why a cached result no longer is what the judges would say: a model whose digest
    on the servers differs from the one its scores were made with (``None`` when all
    match, or when the servers cannot be asked — the cached result is then served)."""
    quick = args.replace(auto_pull=False, timeout_s=min(args.timeout_s, 10.0))
    try:
        digests = route(preflight(quick, progress=False), args.models).digests
    except JudgeError as exc:
        logger().warning(
            "judge: serving cached scores; the model digests were not checked: %s", exc
        )
        return None
    changed = [
        f"{m} {_short(out.model_digests.get(m))} → {_short(d)}"
        for m, d in sorted(digests.items())
        if out.model_digests.get(m) != d
    ]
    if not changed:
        return None
    return f"judge model(s) pulled anew since these scores were made: {', '.join(changed)}"


@stage("judge", stale=models_changed)
def judge(run: StageRun, args: JudgeConfig, extract_responses: StageOutput) -> JudgeOut:
    cat = run.ctx.catalog
    responses_run = extract_responses.run_id
    try:
        out = judge_run(cat, responses_run, args, progress=run.progress, again=run.forced)
    except JudgeError as exc:
        msg = (
            f"{exc} — fix: {judge_fix(args)}, then `gptflow rerun judge` (or run the "
            "`prefect deployment run 'gptflow-judge/judge-rescore'` deployment)"
        )
        if args.required:
            raise JudgeError(msg) from None
        logger().warning("judge skipped: %s", msg)
        raise StageSkipped(msg) from None
    keys = list(out.judge_keys.values())
    judgments = cat.query_df(
        f"SELECT * FROM judgments WHERE run_id = ? AND judge_key IN ({_in(keys)}) "
        'ORDER BY judge_model, example_id, "repeat"',
        [responses_run, *keys],
    )
    responses = cat.query_df(
        "SELECT * FROM responses WHERE run_id = ? ORDER BY example_id", [responses_run]
    )
    for table, df in (("judgments", judgments), ("responses", responses)):
        run.rows.add(table, plain_rows(df))  # the responses' run's rows, kept under it
    logger().info(
        "judged run %s with %s: %d sent (%d scored, %d unparsed, %d failed), %d already "
        "judged, %d reused",
        responses_run, ", ".join(out.judge_models), out.n_sent, out.n_scored, out.n_unparsed,
        out.n_failed, out.n_skipped, out.n_reused,
    )  # fmt: skip
    failed = int(judgments["error"].notna().sum())
    if failed:
        raise StageIncomplete(
            out,
            f"{failed} of {len(judgments)} judgments failed after retries (errors are in "
            "`judgments.error`); `gptflow rerun judge` sends only those",
        )
    return out
