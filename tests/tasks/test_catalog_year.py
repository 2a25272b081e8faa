"""The year-sized catalog of the catalog benchmark, at two weeks: each run writes the rows
it says it does, and a rebuild from the artifacts exported from it gives every row back."""

from __future__ import annotations

from pathlib import Path

from benchmarks.catalog_growth import export_artifacts, time_rebuild
from benchmarks.catalog_rows import CPU_RUN
from benchmarks.catalog_year import YearPlan, build_catalog, judge_keys
from tasks.catalog import Catalog
from tasks.records.rebuild import REBUILT_TABLES, rows_per_table


def test_two_weeks_write_their_rows_and_rebuild_gives_them_back(tmp_path: Path) -> None:
    runs = YearPlan().scaled(14).runs()
    kinds = [r.kind for r in runs]
    assert kinds.count("nightly") == 14 and kinds.count("rerun") == kinds.count("rescore") == 2
    cat = Catalog(tmp_path / "year.duckdb")
    build_catalog(cat, runs[:8])
    build_catalog(cat, runs[8:])  # a second call adds to the same catalog
    ok = next(r for r in runs if r.kind == "nightly" and not r.failed)
    per_table = cat.query_df(
        "SELECT 'metrics' AS t, count(*) AS n FROM metrics WHERE run_id = ? UNION ALL "
        "SELECT 'predictions', count(*) FROM predictions WHERE run_id = ? UNION ALL "
        "SELECT 'spam_examples', count(*) FROM spam_examples WHERE run_id = ?",
        [ok.run_id] * 3,
    )
    assert dict(zip(per_table.t, per_table.n, strict=True)) == {
        t: CPU_RUN[t] for t in ("metrics", "predictions", "spam_examples")
    }
    assert cat.query_df("SELECT count(*) AS n FROM sms_messages").n.tolist() == [5574]
    rescore = next(r for r in runs if r.kind == "rescore")
    summary = cat.query_df(
        "SELECT judge_model, n FROM eval_summary WHERE run_id = ? ORDER BY judge_model",
        [rescore.run_id],
    )
    assert summary.to_dict("records") == [
        {"judge_model": m, "n": 110 * 3} for m in sorted(judge_keys(rescore))
    ]

    folders = export_artifacts(cat, runs, tmp_path / "artifacts")
    report = time_rebuild(tmp_path / "artifacts", tmp_path / "rebuilt.duckdb")
    assert report["runs"] == len(runs) and report["folders"] == folders
    assert report["skipped"] == 0
    rebuilt = Catalog(tmp_path / "rebuilt.duckdb")
    kept = tuple(t for t in REBUILT_TABLES if t != "sms_messages")  # written once, not exported
    assert rows_per_table(rebuilt, kept) == rows_per_table(cat, kept)
