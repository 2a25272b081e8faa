"""A catalog the size of a year of scheduled runs, for the catalog benchmarks.

The year (:class:`YearPlan`): a nightly ``cpu``-profile run that computes every stage
(the worst case: each night's code change invalidates every stage's cache key), a weekly
rerun whose stages are all cache hits (only its ``runs``/``stages``/``gates`` rows are
new), and a weekly re-scoring of a nightly run's responses with a second judge setting
(2 models × 3 repeats, new judge keys, on the responses of the run it scores). Every
14th nightly run fails in ``finetune_instruct`` (its later stages skipped).

What one run writes: :mod:`benchmarks.catalog_rows`.

Rows are written one transaction per run through :meth:`Catalog.write`, in run order, so
the file's layout (row groups filled in the order runs wrote them) is that of a catalog
that grew night by night.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.catalog_rows import (
    NIGHTLY_JUDGE,
    RESCORE_JUDGE,
    STAGES,
    Templates,
    key,
    templates,
)

if TYPE_CHECKING:
    import duckdb

    from tasks.catalog import Catalog

__all__ = ["PlannedRun", "YearPlan", "build_catalog", "judge_keys", "rows_per_run"]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the year."""

    run_id: str
    kind: str
    """``nightly`` (computes every stage), ``rerun`` (every stage cached) or ``rescore``
    (the judge scores ``base``'s responses with other settings; the rest cached)."""
    started_at: dt.datetime
    base: str | None
    """The nightly run whose rows a rerun or re-scoring reads."""
    failed: bool = False
    """A nightly run that failed in finetune_instruct."""


@dataclass(frozen=True)
class YearPlan:
    """Which runs a year holds (module docstring)."""

    nightly: int = 365
    weekly_reruns: int = 52
    rescorings: int = 52
    seed: int = 20260101

    @property
    def n_runs(self) -> int:
        return self.nightly + self.weekly_reruns + self.rescorings

    def scaled(self, nightly: int) -> YearPlan:
        """The same mix over ``nightly`` nights (one rerun and one re-scoring a week)."""
        weeks = nightly // 7
        return dataclasses.replace(self, nightly=nightly, weekly_reruns=weeks, rescorings=weeks)

    def runs(self) -> list[PlannedRun]:
        """Every run, in start order."""
        rng = random.Random(self.seed)
        start = dt.datetime(2026, 1, 1, 2, 0)
        out: list[PlannedRun] = []
        nightly: list[str] = []
        for day in range(self.nightly):
            rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            nightly.append(rid)
            at = start + dt.timedelta(days=day, seconds=rng.randint(0, 600))
            out.append(PlannedRun(rid, "nightly", at, None, failed=day % 14 == 13))
            week, weekday = divmod(day, 7)
            ok = [r for r in out if r.kind == "nightly" and not r.failed]
            if weekday == 3 and week < self.rescorings and ok:
                rid2 = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                out.append(PlannedRun(rid2, "rescore", at + dt.timedelta(hours=13), ok[-1].run_id))
            if weekday == 6 and week < self.weekly_reruns and ok:
                rid3 = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                out.append(PlannedRun(rid3, "rerun", at + dt.timedelta(hours=12), ok[-1].run_id))
        return out


def judge_keys(run: PlannedRun) -> dict[str, str]:
    """The judge keys (model → key) the run's judge stage used."""
    if run.kind == "rescore":
        models, repeats = RESCORE_JUDGE
        return {m: key("judge", run.run_id, m, repeats) for m in models}
    models, repeats = NIGHTLY_JUDGE
    return {m: key("judge", "nightly", m, repeats) for m in models}


def _stage_outputs(
    tpl: Templates, run: PlannedRun, stage: str, producer: str, base: PlannedRun | None
) -> str:
    out: dict[str, Any] = {
        "device": "cpu",
        "digest": key("digest", producer, stage) * 2,
        "key": key("key", producer, stage),
        "key_parts": {
            "code": key("code", producer)[:16],
            "files": {},
            "inputs": {},
            "settings": key("s", stage)[:16],
        },
        "producer_run_id": producer,
        "root": f"/srv/gptflow/artifacts/stages/{stage}/{key('key', producer, stage)}",
        "wall_s": 12.5,
        "detail": tpl.outputs[stage],
    }
    if stage == "judge":
        scored = run if run.kind == "rescore" else (base or run)
        out["judge_keys"] = judge_keys(scored)
        out["responses_run_id"] = run.base if run.kind == "rescore" else producer
    return json.dumps(out, sort_keys=True)


def _insert_run(
    con: duckdb.DuckDBPyConnection,
    tpl: Templates,
    run: PlannedRun,
    base: PlannedRun | None,
    first: bool,
) -> None:
    """Every row ``run`` writes, on ``con`` (inside the caller's transaction)."""
    rid = run.run_id
    t0 = run.started_at
    n_stages = len(STAGES)
    done = STAGES if not run.failed else STAGES[: STAGES.index("finetune_instruct") + 1]
    ended = t0 + dt.timedelta(minutes=50 if run.kind == "nightly" else 1)
    status = "failed" if run.failed else "completed"
    message = "finetune_instruct failed: CUDA out of memory (example)" if run.failed else None
    config = json.dumps({"profile": "cpu", "run": rid, "settings": tpl.config})
    con.execute(
        "INSERT INTO runs (run_id, flow_run_id, profile, config, git_rev, started_at, ended_at, status, message, heartbeat_at, host, pid) "
        "VALUES (?, ?, 'cpu', ?, ?, ?, ?, ?, ?, ?, 'nightly-host', 4242)",
        [
            rid,
            key("flow", rid),
            config,
            key("git", rid) + "0123456789abcdef",
            t0,
            ended,
            status,
            message,
            ended,
        ],
    )
    for i, stage in enumerate(STAGES):
        s0 = t0 + (ended - t0) * i / n_stages
        s1 = t0 + (ended - t0) * (i + 1) / n_stages
        if run.kind == "nightly":
            if stage in done:
                st, hit, producer = (
                    ("failed" if run.failed and stage == done[-1] else "completed"),
                    False,
                    rid,
                )
            else:
                st, hit, producer = "skipped", None, rid
        elif run.kind == "rescore" and stage == "judge":
            st, hit, producer = "completed", False, rid
        else:
            st, hit, producer = "cached", True, base.run_id if base else rid
        outputs = (
            None if st in ("skipped", "failed") else _stage_outputs(tpl, run, stage, producer, base)
        )
        msg = (
            message if st == "failed" else ("an earlier stage failed" if st == "skipped" else None)
        )
        con.execute(
            "INSERT INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [rid, stage, st, s0, s1, hit, outputs, msg],
        )
    if run.kind == "nightly":
        _insert_computed(con, tpl, run, done, first)
    if run.kind == "rescore" and base is not None:
        _insert_judgments(con, tpl, base.run_id, run, t0)
    if not (run.kind == "nightly" and run.failed):
        gates = [
            ("spam_test_max_drop", "test"),
            ("judge_mean_must_not_drop", "llama3 v2"),
            ("finetuned_beats_best_baseline", "test"),
        ]
        for gate, scope in gates if run.kind != "rescore" else gates[1:2]:
            con.execute(
                "INSERT INTO gates (run_id, gate, scope, passed, value, threshold, compared_to_run, message, evaluated_at, n, verdict) "
                "VALUES (?, ?, ?, true, 0.4, 1.0, ?, ?, ?, 300, 'pass')",
                [
                    rid,
                    gate,
                    scope,
                    base.run_id if base else None,
                    f"{gate}: within bounds against the previous run (example message of typical length)",
                    ended,
                ],
            )


def _insert_computed(
    con: duckdb.DuckDBPyConnection,
    tpl: Templates,
    run: PlannedRun,
    done: tuple[str, ...],
    first: bool,
) -> None:
    rid, t0 = run.run_id, run.started_at
    f = tpl.frames
    for name, df in f.items():
        con.register(f"_tpl_{name}", df)
    try:
        if first:
            con.execute(
                "INSERT INTO sms_messages SELECT line_no, label, text, 'sha-sms' FROM _tpl_sms"
            )
            for i, src in enumerate(
                (
                    "the-verdict",
                    "sms-spam",
                    "instruction-data",
                    "gpt2-tokenizer:gpt2/encoder.json",
                    "gpt2-tokenizer:gpt2/vocab.bpe",
                )
            ):
                con.execute(
                    "INSERT INTO sources VALUES (?, ?, ?, ?, ?)",
                    [
                        src,
                        f"https://example.org/{src}",
                        key("sha", src) * 2 + "0" * 16,
                        20000 * (i + 1),
                        t0,
                    ],
                )
        con.execute(
            "INSERT INTO corpus VALUES (?, 'train', 18431, 4612, 18, 256, 256, 'tokens/train.npy'), (?, 'val', 2048, 534, 2, 256, 256, 'tokens/val.npy')",
            [rid, rid],
        )
        con.execute(
            "INSERT INTO spam_examples SELECT ?, split, idx, label, text FROM _tpl_spam", [rid]
        )
        con.execute(
            "INSERT INTO instructions SELECT ?, split, idx, instruction, input, output FROM _tpl_inst",
            [rid],
        )
        stages = [s for s in done if s != done[-1] or not run.failed]
        marks = ", ".join("?" for _ in stages)
        con.execute(
            "INSERT INTO metrics SELECT ?, stage, step, epoch, seen, split, name, "
            "value * (0.9 + (hash(?, stage, step, split, name) % 200) / 1000.0), ? + to_seconds(step * 10) "
            f"FROM _tpl_metrics WHERE stage IN ({marks})",
            [rid, rid, t0, *stages],
        )
        con.execute(
            f"INSERT INTO samples SELECT ?, stage, epoch, step, prompt, text, ? FROM _tpl_samples WHERE stage IN ({marks})",
            [rid, t0, *stages],
        )
        con.execute(
            "INSERT INTO checkpoints SELECT ?, stage, '/srv/gptflow/artifacts/stages/' || stage || '/' || md5(? || stage)[:24] || '/' || name, "
            f"md5(? || stage) || md5(stage || ?), bytes, config, ? FROM _tpl_ckpt WHERE stage IN ({marks})",
            [rid, rid, rid, rid, t0, *stages],
        )
        con.execute("INSERT INTO baselines SELECT ?, * FROM _tpl_base", [rid])
        con.execute(
            "INSERT INTO predictions SELECT ?, stage, model, split, example_id, label, "
            "CASE WHEN hash(?, model, split, example_id) % 17 = 0 THEN (CASE label WHEN 'spam' THEN 'ham' ELSE 'spam' END) ELSE label END, "
            f"(hash(model, ?, example_id) % 1000) / 1000.0 FROM _tpl_preds WHERE stage IN ({marks})",
            [rid, rid, rid, *stages],
        )
        if "extract_responses" in stages:
            pool = tpl.responses_pool
            rng = random.Random(rid)
            resp = f["resp"].assign(response=[rng.choice(pool) for _ in range(len(f["resp"]))])
            con.register("_run_resp", resp)
            con.execute(
                "INSERT INTO responses SELECT ?, example_id, instruction, input, output, response, 60 + example_id % 68, 1.1 FROM _run_resp",
                [rid],
            )
            con.unregister("_run_resp")
            _insert_judgments(con, tpl, rid, run, t0)
    finally:
        for name in f:
            con.unregister(f"_tpl_{name}")


def _insert_judgments(
    con: duckdb.DuckDBPyConnection,
    tpl: Templates,
    responses_run: str,
    run: PlannedRun,
    at: dt.datetime,
) -> None:
    models, repeats = RESCORE_JUDGE if run.kind == "rescore" else NIGHTLY_JUDGE
    keys = judge_keys(run)
    con.register("_tpl_resp2", tpl.frames["resp"][["example_id"]])
    try:
        for model in models:
            settings = json.dumps(
                {
                    "model": model,
                    "repeats": repeats,
                    "prompt_version": "v2",
                    "temperature": 0.0,
                    "seed": 123,
                    "num_ctx": 2048,
                    "structured": True,
                    "model_digest": key("digest", model) * 2,
                    "prompt_sha256": key("p") * 2,
                }
            )
            con.execute(
                "INSERT INTO judgments (run_id, example_id, judge_model, prompt_version, score, raw_reply, latency_s, judged_at, error, repeat, parse_rule, host, judge_key, reply_key, judge_settings) "
                "SELECT ?, example_id, ?, 'v2', (hash(?, ?, example_id, r.repeat) % 101)::INTEGER, "
                '\'{"score": \' || (hash(?, ?, example_id, r.repeat) % 101)::VARCHAR || \', "reason": "the response answers the instruction but misses one detail of the expected output"}\', '
                "2.4, ?, NULL, r.repeat, 'json', 'http://judge-host:11434', ?, md5(? || example_id::VARCHAR)[:24], ? "
                "FROM _tpl_resp2, (SELECT range AS repeat FROM range(?)) r",
                [
                    responses_run,
                    model,
                    run.run_id,
                    model,
                    run.run_id,
                    model,
                    at,
                    keys[model],
                    keys[model],
                    settings,
                    repeats,
                ],
            )
    finally:
        con.unregister("_tpl_resp2")


def build_catalog(
    cat: Catalog, runs: list[PlannedRun], *, seed: int = 1, progress: bool = False
) -> None:
    """Write every run of ``runs`` into ``cat``: one transaction per run, in run order,
    on one connection, then publish. ``cat`` may hold earlier runs of the same plan
    (the shared ``sms_messages`` and ``sources`` rows are written once)."""
    from tqdm import tqdm

    tpl = templates(seed)
    by_id = {r.run_id: r for r in runs}
    cat.migrate()
    with cat.connect() as con:
        first = con.execute("SELECT count(*) FROM sms_messages").fetchone()[0] == 0
        for run in tqdm(runs, desc="building the catalog", unit="run", disable=not progress):
            base = by_id.get(run.base) if run.base else None
            con.execute("BEGIN TRANSACTION")
            try:
                _insert_run(con, tpl, run, base, first)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            first = first and run.kind != "nightly"
    cat.publish()


def rows_per_run(cat: Catalog, tables: tuple[str, ...]) -> dict[str, int]:
    """Rows per table (every table in ``tables``)."""
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in tables)
    df = cat.query_df(sql)
    return {str(t): int(n) for t, n in zip(df["t"], df["n"], strict=True)}


def iter_nightly(runs: list[PlannedRun]) -> Iterator[PlannedRun]:
    """The nightly runs that completed."""
    return (r for r in runs if r.kind == "nightly" and not r.failed)
