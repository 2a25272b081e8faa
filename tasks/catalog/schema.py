"""The catalog's tables: the append-only list of migration steps that create and alter
them. Never edit a released step; add a new one. The views are derived from the tables
and (re)created once the newest step is applied (:mod:`tasks.catalog.views`)."""

from __future__ import annotations

import re

_V1_CORE = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        flow_run_id VARCHAR,
        profile VARCHAR,
        config JSON,
        git_rev VARCHAR,
        started_at TIMESTAMP,
        ended_at TIMESTAMP,
        status VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS stages (
        run_id VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        status VARCHAR,
        started_at TIMESTAMP,
        ended_at TIMESTAMP,
        cache_hit BOOLEAN,
        outputs JSON,
        message VARCHAR,
        PRIMARY KEY (run_id, stage))""",
    """CREATE TABLE IF NOT EXISTS sources (
        name VARCHAR PRIMARY KEY,
        url VARCHAR,
        sha256 VARCHAR,
        bytes BIGINT,
        fetched_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS sms_messages (
        line_no INTEGER,
        label VARCHAR,
        text VARCHAR,
        source_sha256 VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS spam_examples (
        run_id VARCHAR,
        split VARCHAR,
        idx INTEGER,
        label VARCHAR,
        text VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS instructions (
        run_id VARCHAR,
        split VARCHAR,
        idx INTEGER,
        instruction VARCHAR,
        input VARCHAR,
        output VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS corpus (
        run_id VARCHAR,
        split VARCHAR,
        chars BIGINT,
        tokens BIGINT,
        windows BIGINT,
        max_length INTEGER,
        stride INTEGER,
        path VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id VARCHAR,
        stage VARCHAR,
        step BIGINT,
        epoch INTEGER,
        seen BIGINT,
        split VARCHAR,
        name VARCHAR,
        value DOUBLE,
        time TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        run_id VARCHAR,
        stage VARCHAR,
        path VARCHAR,
        sha256 VARCHAR,
        bytes BIGINT,
        config JSON,
        created_at TIMESTAMP)""",
]

_V2_LATER_STAGES = [
    """CREATE TABLE IF NOT EXISTS samples (
        run_id VARCHAR,
        stage VARCHAR,
        epoch INTEGER,
        step BIGINT,
        prompt VARCHAR,
        text VARCHAR,
        time TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS baselines (
        run_id VARCHAR,
        model VARCHAR,
        split VARCHAR,
        accuracy DOUBLE,
        precision DOUBLE,
        recall DOUBLE,
        f1 DOUBLE,
        tn INTEGER,
        fp INTEGER,
        fn INTEGER,
        tp INTEGER,
        settings JSON)""",
    """CREATE TABLE IF NOT EXISTS responses (
        run_id VARCHAR,
        example_id INTEGER,
        instruction VARCHAR,
        input VARCHAR,
        output VARCHAR,
        response VARCHAR,
        new_tokens INTEGER,
        seconds DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS judgments (
        run_id VARCHAR,
        example_id INTEGER,
        judge_model VARCHAR,
        prompt_version VARCHAR,
        score INTEGER,
        raw_reply VARCHAR,
        latency_s DOUBLE,
        judged_at TIMESTAMP,
        error VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS benchmarks (
        name VARCHAR,
        baseline DOUBLE,
        optimized DOUBLE,
        ratio DOUBLE,
        unit VARCHAR,
        hardware JSON,
        details JSON,
        time TIMESTAMP)""",
]

_V3_JUDGE_RELIABILITY = [
    # Every judgment of an example by a judge model is one repeat (0 for older rows); the
    # host that answered and the parse rule that read the score are kept for inspection.
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS repeat INTEGER DEFAULT 0",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS parse_rule VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS host VARCHAR",
]

_V4_EVALUATION = [
    # Per-example spam predictions of the finetuned classifier (stage finetune_spam,
    # model 'finetuned') and of each baseline (stage baseline_spam); example_id is the
    # message's index in its split (spam_examples.idx); labels 'ham' / 'spam'.
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id VARCHAR,
        stage VARCHAR,
        model VARCHAR,
        split VARCHAR,
        example_id INTEGER,
        label VARCHAR,
        prediction VARCHAR,
        prob_spam DOUBLE)""",
    # Regression gates evaluated at the end of a run; passed NULL = not evaluated.
    """CREATE TABLE IF NOT EXISTS gates (
        run_id VARCHAR,
        gate VARCHAR,
        scope VARCHAR,
        passed BOOLEAN,
        value DOUBLE,
        threshold DOUBLE,
        compared_to_run VARCHAR,
        message VARCHAR,
        evaluated_at TIMESTAMP)""",
]

_V5_JUDGE_KEYS = [
    # Every judgment records its judge key: the hash of every setting that can change it
    # (model and the digest its server reported, prompt and schema digests, sampling
    # options, structured output, reader version); judge_settings holds them by name and
    # reply_key hashes all but the reader version.
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS judge_key VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS reply_key VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS judge_settings JSON",
]

_V6_RUN_LIVENESS = [
    # Why a run failed or crashed (one line); where its flow process runs and when it
    # last beat, so a run whose process died is told from one still running.
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS message VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER",
]

_V7_GATE_EVIDENCE = [
    # What a gate's verdict rests on (paired examples) and the verdict itself: "not
    # enough data" (below the gate's minimum, passed true) apart from a real pass.
    "ALTER TABLE gates ADD COLUMN IF NOT EXISTS n INTEGER",
    "ALTER TABLE gates ADD COLUMN IF NOT EXISTS verdict VARCHAR",
]

#: Append-only list of schema steps; step ``i`` (0-based) brings the schema to ``i + 1``.
MIGRATIONS: list[list[str]] = [
    _V1_CORE,
    _V2_LATER_STAGES,
    _V3_JUDGE_RELIABILITY,
    _V4_EVALUATION,
    _V5_JUDGE_KEYS,
    _V6_RUN_LIVENESS,
    _V7_GATE_EVIDENCE,
]

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)

_CREATE_TABLE_RE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")

#: Tables the generic write methods accept (a guard against SQL injection via names):
#: every table the steps create.
KNOWN_TABLES = frozenset(
    m.group(1) for step in MIGRATIONS for stmt in step for m in [_CREATE_TABLE_RE.match(stmt)] if m
)


# ----------------------------------------------------------------------------- backends
# The one place where the two backends' DDL differs. DuckLake (1.5.5) accepts the same
# tables, types (JSON included) and views as a DuckDB file, except PRIMARY KEY / UNIQUE
# constraints ("not supported in DuckLake"). On a lake the released steps run with those
# clauses removed; keys are upheld by the writers either way (``upsert_rows`` and
# ``record_stage`` delete and insert by key in one transaction), the file's constraints
# are a second guard. The released steps themselves stay byte-for-byte unchanged.
_TABLE_KEY_RE = re.compile(r",\s*PRIMARY KEY\s*\([^)]*\)", re.IGNORECASE)
_COLUMN_KEY_RE = re.compile(r"\s+PRIMARY KEY\b(?!\s*\()", re.IGNORECASE)


def lake_ddl(stmt: str) -> str:
    """``stmt`` as a DuckLake accepts it (PRIMARY KEY constraints dropped)."""
    return _COLUMN_KEY_RE.sub("", _TABLE_KEY_RE.sub("", stmt))


def migration_step(step: int, *, lake: bool = False) -> list[str]:
    """The statements of migration step ``step`` (0-based) for one backend."""
    stmts = MIGRATIONS[step]
    return [lake_ddl(s) for s in stmts] if lake else list(stmts)
