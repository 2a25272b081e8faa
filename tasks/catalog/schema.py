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

_V3_JUDGE_RELIABILITY = [
    # Every judgment of an example by a judge model is one repeat (0 for older rows); the
    # host that answered and the parse rule that read the score are kept for inspection.
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS repeat INTEGER DEFAULT 0",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS parse_rule VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS host VARCHAR",
    # A reply without a score (n_unparsed) is not a failed request (n_failed).
    """CREATE OR REPLACE VIEW eval_summary AS
    SELECT run_id, judge_model, prompt_version,
           count(*) AS n,
           count(score) AS n_scored,
           count(*) FILTER (WHERE score IS NULL AND error IS NULL) AS n_unparsed,
           count(*) FILTER (WHERE error IS NOT NULL) AS n_failed,
           avg(score) AS mean_score,
           median(score) AS median_score,
           min(score) AS min_score,
           max(score) AS max_score,
           count(DISTINCT example_id) AS n_examples,
           max(repeat) + 1 AS repeats
    FROM judgments
    GROUP BY run_id, judge_model, prompt_version""",
    """CREATE OR REPLACE VIEW eval_examples AS
    SELECT r.run_id, r.example_id, r.instruction, r.input, r.output, r.response,
           j.judge_model, j.prompt_version, j.score, j.raw_reply,
           j.repeat, j.parse_rule, j.error
    FROM responses r
    LEFT JOIN judgments j ON j.run_id = r.run_id AND j.example_id = r.example_id""",
    # Per example and judge model: the spread of the scores over the repeats.
    """CREATE OR REPLACE VIEW judge_spread AS
    SELECT run_id, prompt_version, judge_model, example_id,
           count(*) AS n_repeats,
           count(score) AS n_scored,
           avg(score) AS mean_score,
           stddev_samp(score) AS stddev_score,
           min(score) AS min_score,
           max(score) AS max_score,
           max(score) - min(score) AS range_score
    FROM judgments
    GROUP BY run_id, prompt_version, judge_model, example_id""",
    # Agreement of each pair of judge models on the examples both scored (per-example
    # mean over repeats): Spearman's rho (Pearson on average ranks), Kendall's tau-b
    # (sum of sign products over example pairs), and Cohen's kappa with quadratic weights
    # on 10-point bins (0-9, ..., 90-100); with quadratic weights it reduces to
    # 1 - mean((a-b)^2) / (var(a) + var(b) + (mean(a) - mean(b))^2), population moments.
    """CREATE OR REPLACE VIEW judge_agreement AS
    WITH s AS (
        SELECT run_id, prompt_version, judge_model, example_id, mean_score AS score
        FROM judge_spread WHERE mean_score IS NOT NULL),
    pairs AS (
        SELECT a.run_id, a.prompt_version, a.judge_model AS judge_a, b.judge_model AS judge_b,
               a.example_id, a.score AS sa, b.score AS sb,
               least(floor(a.score / 10), 9) AS ba, least(floor(b.score / 10), 9) AS bb
        FROM s a JOIN s b
          ON a.run_id = b.run_id AND a.prompt_version = b.prompt_version
         AND a.example_id = b.example_id AND a.judge_model < b.judge_model),
    ranked AS (
        SELECT *,
               rank() OVER (PARTITION BY run_id, prompt_version, judge_a, judge_b ORDER BY sa)
               + (count(*) OVER (PARTITION BY run_id, prompt_version, judge_a, judge_b, sa)
                  - 1) / 2.0 AS ra,
               rank() OVER (PARTITION BY run_id, prompt_version, judge_a, judge_b ORDER BY sb)
               + (count(*) OVER (PARTITION BY run_id, prompt_version, judge_a, judge_b, sb)
                  - 1) / 2.0 AS rb
        FROM pairs),
    stats AS (
        SELECT run_id, prompt_version, judge_a, judge_b,
               count(*) AS n,
               corr(ra, rb) AS rho,
               avg((ba - bb) * (ba - bb)) AS observed,
               var_pop(ba) + var_pop(bb) + (avg(ba) - avg(bb)) * (avg(ba) - avg(bb))
                   AS expected,
               avg(sa - sb) AS mean_diff,
               avg(abs(sa - sb)) AS mean_abs_diff
        FROM ranked
        GROUP BY run_id, prompt_version, judge_a, judge_b),
    kendall AS (
        SELECT x.run_id, x.prompt_version, x.judge_a, x.judge_b,
               sum(sign(x.sa - y.sa) * sign(x.sb - y.sb)) AS s_ab,
               sum(abs(sign(x.sa - y.sa))) AS s_aa,
               sum(abs(sign(x.sb - y.sb))) AS s_bb
        FROM pairs x JOIN pairs y
          ON x.run_id = y.run_id AND x.prompt_version = y.prompt_version
         AND x.judge_a = y.judge_a AND x.judge_b = y.judge_b AND x.example_id < y.example_id
        GROUP BY x.run_id, x.prompt_version, x.judge_a, x.judge_b)
    SELECT st.run_id, st.prompt_version, st.judge_a, st.judge_b, st.n,
           CASE WHEN isnan(st.rho) THEN NULL ELSE st.rho END AS spearman,
           k.s_ab / NULLIF(sqrt(k.s_aa * k.s_bb), 0) AS kendall_tau,
           1 - st.observed / NULLIF(st.expected, 0) AS qwk,
           st.mean_diff,
           st.mean_abs_diff
    FROM stats st
    LEFT JOIN kendall k
      ON k.run_id = st.run_id AND k.prompt_version = st.prompt_version
     AND k.judge_a = st.judge_a AND k.judge_b = st.judge_b""",
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
    # The run whose rows a run's stage reads: the judge's belong to the run whose
    # responses it scored (outputs.responses_run_id); a cached stage's to the run that
    # computed them (outputs.producer_run_id); otherwise the run itself.
    """CREATE OR REPLACE VIEW stage_producers AS
    SELECT run_id, stage,
           coalesce(outputs->>'responses_run_id', outputs->>'producer_run_id', run_id)
               AS producer_run_id
    FROM stages""",
    # spam_accuracy again, resolving each run's finetune_spam / baseline_spam rows
    # through the stage's producing run (a run without a stage row reads its own rows).
    """CREATE OR REPLACE VIEW spam_accuracy AS
    WITH ft_rows AS (
        SELECT run_id, split, arg_max(value, time) AS finetuned
        FROM metrics
        WHERE stage = 'finetune_spam' AND name = 'final_accuracy'
        GROUP BY run_id, split),
    bl_rows AS (
        SELECT run_id, split,
               max(accuracy) FILTER (WHERE model = 'logreg_bow') AS logreg_bow,
               max(accuracy) FILTER (WHERE model = 'logreg_tfidf') AS logreg_tfidf,
               max(accuracy) FILTER (WHERE model = 'majority') AS majority
        FROM baselines
        GROUP BY run_id, split),
    src AS (
        SELECT run_id, stage, producer_run_id FROM stage_producers
        WHERE stage IN ('finetune_spam', 'baseline_spam')
        UNION
        SELECT DISTINCT r.run_id, 'finetune_spam', r.run_id FROM ft_rows r
        WHERE NOT EXISTS (SELECT 1 FROM stages s
                          WHERE s.run_id = r.run_id AND s.stage = 'finetune_spam')
        UNION
        SELECT DISTINCT r.run_id, 'baseline_spam', r.run_id FROM bl_rows r
        WHERE NOT EXISTS (SELECT 1 FROM stages s
                          WHERE s.run_id = r.run_id AND s.stage = 'baseline_spam')),
    ft AS (
        SELECT s.run_id, r.split, r.finetuned
        FROM src s JOIN ft_rows r ON r.run_id = s.producer_run_id
        WHERE s.stage = 'finetune_spam'),
    bl AS (
        SELECT s.run_id, r.split, r.logreg_bow, r.logreg_tfidf, r.majority
        FROM src s JOIN bl_rows r ON r.run_id = s.producer_run_id
        WHERE s.stage = 'baseline_spam'),
    k AS (SELECT run_id, split FROM ft UNION SELECT run_id, split FROM bl)
    SELECT k.run_id, k.split, ft.finetuned, bl.logreg_bow, bl.logreg_tfidf, bl.majority
    FROM k
    LEFT JOIN ft ON ft.run_id = k.run_id AND ft.split IS NOT DISTINCT FROM k.split
    LEFT JOIN bl ON bl.run_id = k.run_id AND bl.split IS NOT DISTINCT FROM k.split""",
]

_V5_JUDGE_KEYS = [
    # Every judgment records its judge key: the hash of every setting that can change it
    # (model and the digest its server reported, prompt and schema digests, sampling
    # options, structured output, reader version); judge_settings holds them by name and
    # reply_key hashes all but the reader version.
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS judge_key VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS reply_key VARCHAR",
    "ALTER TABLE judgments ADD COLUMN IF NOT EXISTS judge_settings JSON",
    # The judge keys each run used, on the responses of which run: those its judge stage
    # recorded (outputs.judge_keys, model → key); a judge stage row from before judge keys
    # reads the rows without one; judgments that no judge stage row of their run speaks
    # for (written by the library directly) are read under their own run, key by key.
    """CREATE OR REPLACE VIEW judge_runs AS
    SELECT run_id, outputs->>'responses_run_id' AS responses_run_id,
           unnest(map_values(from_json(outputs->'judge_keys', '"MAP(VARCHAR, VARCHAR)"')))
               AS judge_key
    FROM stages WHERE stage = 'judge' AND (outputs->'judge_keys') IS NOT NULL
    UNION ALL
    SELECT run_id, outputs->>'responses_run_id', NULL FROM stages
    WHERE stage = 'judge' AND (outputs->'judge_keys') IS NULL
      AND (outputs->>'responses_run_id') IS NOT NULL
    UNION ALL
    SELECT DISTINCT j.run_id, j.run_id, j.judge_key FROM judgments j
    WHERE NOT EXISTS (SELECT 1 FROM stages s WHERE s.run_id = j.run_id AND s.stage = 'judge')""",
    # The judgments each run used (run_id: that run; responses_run_id: whose rows).
    """CREATE OR REPLACE VIEW run_judgments AS
    SELECT u.run_id, j.run_id AS responses_run_id, j.example_id, j.judge_model,
           j.prompt_version, j."repeat", j.score, j.raw_reply, j.parse_rule, j.latency_s,
           j.judged_at, j.error, j.host, j.judge_key
    FROM judge_runs u JOIN judgments j
      ON j.run_id = u.responses_run_id AND j.judge_key IS NOT DISTINCT FROM u.judge_key""",
    # Per responses run and judge key: every key ever used (older settings included).
    """CREATE OR REPLACE VIEW judge_key_summary AS
    SELECT run_id, judge_model, prompt_version, judge_key,
           count(*) AS n,
           count(score) AS n_scored,
           count(*) FILTER (WHERE score IS NULL AND error IS NULL) AS n_unparsed,
           count(*) FILTER (WHERE error IS NOT NULL) AS n_failed,
           avg(score) AS mean_score,
           median(score) AS median_score,
           min(score) AS min_score,
           max(score) AS max_score,
           count(DISTINCT example_id) AS n_examples,
           max("repeat") + 1 AS repeats
    FROM judgments
    GROUP BY run_id, judge_model, prompt_version, judge_key""",
    # Per run: the summary of the keys that run used.
    """CREATE OR REPLACE VIEW eval_summary AS
    SELECT u.run_id, s.judge_model, s.prompt_version, s.n, s.n_scored, s.n_unparsed,
           s.n_failed, s.mean_score, s.median_score, s.min_score, s.max_score, s.n_examples,
           s.repeats, s.run_id AS responses_run_id, s.judge_key
    FROM judge_runs u JOIN judge_key_summary s
      ON s.run_id = u.responses_run_id AND s.judge_key IS NOT DISTINCT FROM u.judge_key""",
    # Every response of the runs each run judged (or holds), with that run's judgments.
    """CREATE OR REPLACE VIEW eval_examples AS
    WITH viewers AS (
        SELECT DISTINCT run_id, responses_run_id FROM judge_runs
        UNION
        SELECT DISTINCT r.run_id, r.run_id FROM responses r
        WHERE NOT EXISTS (SELECT 1 FROM judge_runs u WHERE u.run_id = r.run_id))
    SELECT v.run_id, r.example_id, r.instruction, r.input, r.output, r.response,
           j.judge_model, j.prompt_version, j.score, j.raw_reply,
           j."repeat", j.parse_rule, j.error, v.responses_run_id, j.judge_key
    FROM viewers v JOIN responses r ON r.run_id = v.responses_run_id
    LEFT JOIN run_judgments j ON j.run_id = v.run_id AND j.example_id = r.example_id""",
    """CREATE OR REPLACE VIEW judge_spread AS
    SELECT run_id, prompt_version, judge_model, example_id,
           count(*) AS n_repeats,
           count(score) AS n_scored,
           avg(score) AS mean_score,
           stddev_samp(score) AS stddev_score,
           min(score) AS min_score,
           max(score) AS max_score,
           max(score) - min(score) AS range_score,
           judge_key
    FROM run_judgments
    GROUP BY run_id, prompt_version, judge_model, judge_key, example_id""",
    # judge_agreement as before, per run over the keys it used (key_a, key_b: the pair).
    """CREATE OR REPLACE VIEW judge_agreement AS
    WITH s AS (
        SELECT run_id, prompt_version, judge_model, judge_key, example_id, mean_score AS score
        FROM judge_spread WHERE mean_score IS NOT NULL),
    pairs AS (
        SELECT a.run_id, a.prompt_version, a.judge_model AS judge_a, b.judge_model AS judge_b,
               a.judge_key AS key_a, b.judge_key AS key_b,
               a.example_id, a.score AS sa, b.score AS sb,
               least(floor(a.score / 10), 9) AS ba, least(floor(b.score / 10), 9) AS bb
        FROM s a JOIN s b
          ON a.run_id = b.run_id AND a.prompt_version = b.prompt_version
         AND a.example_id = b.example_id AND a.judge_model < b.judge_model),
    ranked AS (
        SELECT *,
               rank() OVER w_a + (count(*) OVER w_sa - 1) / 2.0 AS ra,
               rank() OVER w_b + (count(*) OVER w_sb - 1) / 2.0 AS rb
        FROM pairs
        WINDOW w_a AS (PARTITION BY run_id, prompt_version, judge_a, judge_b, key_a, key_b
                       ORDER BY sa),
               w_sa AS (PARTITION BY run_id, prompt_version, judge_a, judge_b, key_a, key_b, sa),
               w_b AS (PARTITION BY run_id, prompt_version, judge_a, judge_b, key_a, key_b
                       ORDER BY sb),
               w_sb AS (PARTITION BY run_id, prompt_version, judge_a, judge_b, key_a, key_b, sb)),
    stats AS (
        SELECT run_id, prompt_version, judge_a, judge_b, key_a, key_b,
               count(*) AS n,
               corr(ra, rb) AS rho,
               avg((ba - bb) * (ba - bb)) AS observed,
               var_pop(ba) + var_pop(bb) + (avg(ba) - avg(bb)) * (avg(ba) - avg(bb))
                   AS expected,
               avg(sa - sb) AS mean_diff,
               avg(abs(sa - sb)) AS mean_abs_diff
        FROM ranked
        GROUP BY run_id, prompt_version, judge_a, judge_b, key_a, key_b),
    kendall AS (
        SELECT x.run_id, x.prompt_version, x.judge_a, x.judge_b, x.key_a, x.key_b,
               sum(sign(x.sa - y.sa) * sign(x.sb - y.sb)) AS s_ab,
               sum(abs(sign(x.sa - y.sa))) AS s_aa,
               sum(abs(sign(x.sb - y.sb))) AS s_bb
        FROM pairs x JOIN pairs y
          ON x.run_id = y.run_id AND x.prompt_version = y.prompt_version
         AND x.key_a IS NOT DISTINCT FROM y.key_a AND x.key_b IS NOT DISTINCT FROM y.key_b
         AND x.judge_a = y.judge_a AND x.judge_b = y.judge_b AND x.example_id < y.example_id
        GROUP BY x.run_id, x.prompt_version, x.judge_a, x.judge_b, x.key_a, x.key_b)
    SELECT st.run_id, st.prompt_version, st.judge_a, st.judge_b, st.n,
           CASE WHEN isnan(st.rho) THEN NULL ELSE st.rho END AS spearman,
           k.s_ab / NULLIF(sqrt(k.s_aa * k.s_bb), 0) AS kendall_tau,
           1 - st.observed / NULLIF(st.expected, 0) AS qwk,
           st.mean_diff,
           st.mean_abs_diff,
           st.key_a,
           st.key_b
    FROM stats st
    LEFT JOIN kendall k
      ON k.run_id = st.run_id AND k.prompt_version = st.prompt_version
     AND k.judge_a = st.judge_a AND k.judge_b = st.judge_b
     AND k.key_a IS NOT DISTINCT FROM st.key_a AND k.key_b IS NOT DISTINCT FROM st.key_b""",
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
        "predictions",
        "gates",
    }
)

#: Views created by the migrations.
KNOWN_VIEWS = frozenset(
    {
        "spam_accuracy",
        "eval_summary",
        "eval_examples",
        "judge_spread",
        "judge_agreement",
        "stage_producers",
        "judge_runs",
        "run_judgments",
        "judge_key_summary",
    }
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
