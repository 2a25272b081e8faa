"""The catalog's schema: the append-only list of migration steps, and the tables and
views they create. Never edit a released step; add a new one."""

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
    """CREATE OR REPLACE VIEW spam_accuracy AS
    WITH ft AS (
        SELECT run_id, split, arg_max(value, time) AS finetuned
        FROM metrics
        WHERE stage = 'finetune_spam' AND name = 'final_accuracy'
        GROUP BY run_id, split),
    bl AS (
        SELECT run_id, split,
               max(accuracy) FILTER (WHERE model = 'logreg_bow') AS logreg_bow,
               max(accuracy) FILTER (WHERE model = 'logreg_tfidf') AS logreg_tfidf,
               max(accuracy) FILTER (WHERE model = 'majority') AS majority
        FROM baselines
        GROUP BY run_id, split),
    k AS (SELECT run_id, split FROM ft UNION SELECT run_id, split FROM bl)
    SELECT k.run_id, k.split, ft.finetuned, bl.logreg_bow, bl.logreg_tfidf, bl.majority
    FROM k
    LEFT JOIN ft ON ft.run_id IS NOT DISTINCT FROM k.run_id
                AND ft.split IS NOT DISTINCT FROM k.split
    LEFT JOIN bl ON bl.run_id IS NOT DISTINCT FROM k.run_id
                AND bl.split IS NOT DISTINCT FROM k.split""",
    """CREATE OR REPLACE VIEW eval_summary AS
    SELECT run_id, judge_model, prompt_version,
           count(*) AS n,
           count(score) AS n_scored,
           count(*) - count(score) AS n_failed,
           avg(score) AS mean_score,
           median(score) AS median_score,
           min(score) AS min_score,
           max(score) AS max_score
    FROM judgments
    GROUP BY run_id, judge_model, prompt_version""",
    """CREATE OR REPLACE VIEW eval_examples AS
    SELECT r.run_id, r.example_id, r.instruction, r.input, r.output, r.response,
           j.judge_model, j.prompt_version, j.score, j.raw_reply
    FROM responses r
    LEFT JOIN judgments j ON j.run_id = r.run_id AND j.example_id = r.example_id""",
]

#: Append-only list of schema steps; step ``i`` (0-based) brings the schema to ``i + 1``.
MIGRATIONS: list[list[str]] = [_V1_CORE, _V2_LATER_STAGES]

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)

#: Tables the generic write methods accept (a guard against SQL injection via names).
KNOWN_TABLES = frozenset(
    {
        "runs",
        "stages",
        "sources",
        "sms_messages",
        "spam_examples",
        "instructions",
        "corpus",
        "metrics",
        "checkpoints",
        "samples",
        "baselines",
        "responses",
        "judgments",
        "benchmarks",
    }
)

#: Views created by the migrations.
KNOWN_VIEWS = frozenset({"spam_accuracy", "eval_summary", "eval_examples"})


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
