"""The catalog's schema: the append-only list of migration steps, and the tables and
views they create. Never edit a released step; add a new one."""

from __future__ import annotations

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

_V3_EVALUATION = [
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
    # The run whose rows a run's stage reads: a cached stage's rows belong to the run
    # that computed them (outputs.producer_run_id); the judge's to the run whose
    # responses it scored (outputs.responses_run_id); otherwise the run itself.
    """CREATE OR REPLACE VIEW stage_producers AS
    SELECT run_id, stage,
           coalesce(outputs->>'producer_run_id', outputs->>'responses_run_id', run_id)
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

#: Append-only list of schema steps; step ``i`` (0-based) brings the schema to ``i + 1``.
MIGRATIONS: list[list[str]] = [_V1_CORE, _V2_LATER_STAGES, _V3_EVALUATION]

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
KNOWN_VIEWS = frozenset({"spam_accuracy", "eval_summary", "eval_examples", "stage_producers"})
