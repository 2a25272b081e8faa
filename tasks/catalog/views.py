"""The catalog's views: derived from the tables, so they hold nothing to migrate.

:data:`VIEWS` holds the current definition of every view, in dependency order; a
migration that reaches the newest schema version (re)creates them all
(:func:`tasks.catalog.migrate.apply_steps`). A changed view needs a new migration step
(an empty one will do), so that existing catalogs get it.

How the views find a run's rows: a cached stage's rows belong to the run that computed
them, and the judge's to the run whose responses it scored (``stage_producers``); a run
judges with the judge keys its judge stage recorded (``judge_runs``), so scores of other
settings never mix in (``run_judgments``, ``eval_summary``, ``judge_agreement``).
"""

from __future__ import annotations

#: Every view, ``name -> SELECT``, in dependency order (a view after those it reads).
VIEWS: dict[str, str] = {
    # The run whose rows a run's stage reads: the judge's belong to the run whose
    # responses it scored (outputs.responses_run_id); a cached stage's to the run that
    # computed them (outputs.producer_run_id); otherwise the run itself.
    "stage_producers": """
    SELECT run_id, stage,
           coalesce(outputs->>'responses_run_id', outputs->>'producer_run_id', run_id)
               AS producer_run_id
    FROM stages""",
    # Per run and split: the finetuned classifier's final accuracy and each baseline's,
    # read through the stage's producing run (a run without a stage row reads its own).
    "spam_accuracy": """
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
    # The judge keys each run used, on the responses of which run: those its judge stage
    # recorded (outputs.judge_keys, model -> key); a judge stage row from before judge keys
    # reads the rows without one; judgments that no judge stage row of their run speaks
    # for (written by the library directly) are read under their own run, key by key.
    "judge_runs": """
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
    "run_judgments": """
    SELECT u.run_id, j.run_id AS responses_run_id, j.example_id, j.judge_model,
           j.prompt_version, j."repeat", j.score, j.raw_reply, j.parse_rule, j.latency_s,
           j.judged_at, j.error, j.host, j.judge_key
    FROM judge_runs u JOIN judgments j
      ON j.run_id = u.responses_run_id AND j.judge_key IS NOT DISTINCT FROM u.judge_key""",
    # Per responses run and judge key: every key ever used (older settings included).
    "judge_key_summary": """
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
    # Per run: the summary of the keys that run used. A reply without a score
    # (n_unparsed) is not a failed request (n_failed).
    "eval_summary": """
    SELECT u.run_id, s.judge_model, s.prompt_version, s.n, s.n_scored, s.n_unparsed,
           s.n_failed, s.mean_score, s.median_score, s.min_score, s.max_score, s.n_examples,
           s.repeats, s.run_id AS responses_run_id, s.judge_key
    FROM judge_runs u JOIN judge_key_summary s
      ON s.run_id = u.responses_run_id AND s.judge_key IS NOT DISTINCT FROM u.judge_key""",
    # Every response of the runs each run judged (or holds), with that run's judgments.
    "eval_examples": """
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
    # Per run, example and judge model: the spread of the scores over the repeats.
    "judge_spread": """
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
    # Agreement of each pair of judge models on the examples both scored (per-example
    # mean over repeats), per run over the keys it used (key_a, key_b: the pair):
    # Spearman's rho (Pearson on average ranks), Kendall's tau-b (sum of sign products
    # over example pairs), and Cohen's kappa with quadratic weights on 10-point bins
    # (0-9, ..., 90-100); with quadratic weights it reduces to
    # 1 - mean((a-b)^2) / (var(a) + var(b) + (mean(a) - mean(b))^2), population moments.
    "judge_agreement": """
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
}

#: The names of the views.
KNOWN_VIEWS = frozenset(VIEWS)


def view_statements() -> list[str]:
    """``CREATE OR REPLACE VIEW`` for every view, in dependency order."""
    return [f"CREATE OR REPLACE VIEW {name} AS{sql}" for name, sql in VIEWS.items()]
