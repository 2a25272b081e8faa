"""A judgment belongs to its settings (issue 17, point 1), through the judge stage and the
catalog, against the Ollama stand-in (whose default reply is a hash of what shapes a
deterministic model's reply, so changed settings give other scores).

- a changed setting that can change a reply sends every judgment again, under a new
  judge key; the older rows stay queryable;
- going back to earlier settings is a cache hit whose outputs equal what
  ``eval_summary`` shows for that run;
- a model pulled anew (same tag, new digest) is noticed behind an unchanged stage key;
- resuming skips only rows of the same key; a reply stored under the same reply
  settings (another reader, another number of repeats) is reused, not asked again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from benchmarks.ollama_stub import OllamaStub
from gpt.eval.judge.settings import JudgeConfig
from tasks.catalog import Catalog
from tasks.stages.contract import RunContext, StageOutput
from tasks.stages.judge import responses_input
from tasks.stages.runner import run_stage

N = 5
STATS = ["judge_model", "judge_key", "n", "n_scored", "n_unparsed", "n_failed", "mean_score",
         "median_score", "min_score", "max_score"]  # fmt: skip


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    cat = Catalog(tmp_path / "catalog.duckdb")
    rows = [
        {"run_id": "resp", "example_id": i, "instruction": f"Name the number {i}.", "input": "",
         "output": str(i), "response": f"It is {i}.", "new_tokens": 3, "seconds": 0.1}
        for i in range(N)
    ]  # fmt: skip
    cat.replace_rows("responses", rows, where={"run_id": "resp"})
    return cat


def _judge(cat: Catalog, tmp_path: Path, run_id: str, cfg: JudgeConfig, **kw: Any) -> StageOutput:
    ctx = RunContext(
        run_id=run_id,
        catalog_settings=cat.settings,
        artifacts=str(tmp_path / "artifacts"),
        datasets=str(tmp_path / "datasets"),
        progress=False,
        **kw,
    )
    return run_stage(ctx, "judge", cfg, extract_responses=responses_input(cat, "resp"))


def _cfg(stub: OllamaStub, **kw: Any) -> JudgeConfig:
    return JudgeConfig(hosts=[stub.host], backoff_s=0.01, **kw)


def _shown(cat: Catalog, run_id: str) -> list[dict[str, Any]]:
    """What eval_summary shows for ``run_id`` (the statistics columns)."""
    df = cat.query_df("SELECT * FROM eval_summary WHERE run_id = ? ORDER BY judge_model", [run_id])
    return df[STATS].astype(object).where(df[STATS].notna(), None).to_dict("records")


def _outputs(res: StageOutput) -> list[dict[str, Any]]:
    return [{k: row[k] for k in STATS} for row in res.data["summary"]]


def _stage_row(cat: Catalog, run_id: str) -> dict[str, Any]:
    df = cat.query_df("SELECT * FROM stages WHERE run_id = ? AND stage = 'judge'", [run_id])
    return df.iloc[0].to_dict()


def _changes(monkeypatch: pytest.MonkeyPatch, what: str) -> dict[str, Any]:
    """Settings overrides (or a patched prompt) for one judge setting that can change a
    reply; returns the JudgeConfig fields to change."""
    if what == "prompt":
        import gpt.eval.judge.prompt as prompt

        monkeypatch.setattr(prompt, "PROMPT_TEMPLATE", "Rate it. " + prompt.PROMPT_TEMPLATE)
        return {}
    return {
        "temperature": {"temperature": 0.7},
        "seed": {"seed": 7},
        "num_ctx": {"num_ctx": 4096},
        "structured": {"structured": False},
    }[what]


#: One change of each judge setting that can change a reply.
CHANGES = ["temperature", "seed", "num_ctx", "structured", "prompt"]


def test_a_changed_setting_judges_again_and_going_back_is_consistent(
    cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OllamaStub() as stub:
        first = _judge(cat, tmp_path, "j0", _cfg(stub))
        assert not first.cache_hit and stub.chat_count == N
        assert _shown(cat, "j0") == _outputs(first)
        results = {}
        for i, what in enumerate(CHANGES, start=1):
            with monkeypatch.context() as m:
                res = _judge(cat, tmp_path, f"j{i}", _cfg(stub, **_changes(m, what)))
            # a new judge key: every judgment is asked for again, none taken from another key
            assert not res.cache_hit, what
            assert stub.chat_count == (i + 1) * N, f"{what}: nothing was sent again"
            assert (res.out.n_sent, res.out.n_skipped) == (N, 0), what
            assert _shown(cat, f"j{i}") == _outputs(res), what
            results[what] = res
        keys = {tuple(r.out.judge_keys.values()) for r in [first, *results.values()]}
        assert len(keys) == len(CHANGES) + 1

        # back to the first settings: a cache hit whose outputs equal what the catalog shows
        back = _judge(cat, tmp_path, "back", _cfg(stub))
        assert back.cache_hit and stub.chat_count == (len(CHANGES) + 1) * N
        assert _shown(cat, "back") == _outputs(back) == _outputs(first)
        for i, what in enumerate(CHANGES, start=1):  # each run keeps showing its own rows
            assert _shown(cat, f"j{i}") == _outputs(results[what]), what

    # older rows stay queryable: every key's judgments are in the table, each complete
    per_key = cat.query_df("SELECT judge_key, count(*) AS n FROM judgments GROUP BY judge_key")
    assert sorted(per_key["n"]) == [N] * (len(CHANGES) + 1)
    settings = cat.query_df(
        "SELECT DISTINCT judge_key, judge_settings->>'model_digest' AS digest, "
        "judge_settings->>'temperature' AS temperature FROM judgments"
    )
    assert settings["digest"].nunique() == 1 and len(settings) == len(CHANGES) + 1
    assert set(settings["temperature"]) == {"0.0", "0.7"}


def test_the_stand_in_scores_differ_between_settings(cat: Catalog, tmp_path: Path) -> None:
    """The scenario of the issue: the first settings score low, the second high; each
    run shows its own (the old code kept the first scores and sent nothing)."""

    def reply(body: dict[str, Any]) -> dict[str, Any]:
        return {"score": 10 if body["options"]["temperature"] == 0 else 90}

    with OllamaStub(reply=reply) as stub:
        low = _judge(cat, tmp_path, "a", _cfg(stub))
        high = _judge(cat, tmp_path, "b", _cfg(stub, temperature=0.5))
        again = _judge(cat, tmp_path, "c", _cfg(stub))
    assert [r["mean_score"] for r in _outputs(low)] == [10]
    assert [r["mean_score"] for r in _outputs(high)] == [90]
    assert again.cache_hit and [r["mean_score"] for r in _outputs(again)] == [10]
    assert [r["mean_score"] for r in _shown(cat, "b")] == [90]
    assert [r["mean_score"] for r in _shown(cat, "c")] == [10]


def test_a_model_pulled_anew_is_noticed_behind_the_same_stage_key(
    cat: Catalog, tmp_path: Path
) -> None:
    with OllamaStub() as stub:
        first = _judge(cat, tmp_path, "p1", _cfg(stub))
        old_digest = stub.digest("llama3")
        stub.repull("llama3")
        renewed = _judge(cat, tmp_path, "p2", _cfg(stub))
        assert renewed.key == first.key  # the stage key cannot know the digest...
        assert not renewed.cache_hit and stub.chat_count == 2 * N  # ...the check does
        assert renewed.out.model_digests != first.out.model_digests
        assert "pulled anew" in (_stage_row(cat, "p2")["message"] or "")
        assert _shown(cat, "p2") == _outputs(renewed) != _outputs(first)

        # the old model back: the folder (now holding the new model's result) is stale
        # again; its judgments are still in the catalog, so nothing is sent
        stub.repull("llama3", old_digest)
        back = _judge(cat, tmp_path, "p3", _cfg(stub))
        assert stub.chat_count == 2 * N and back.out.n_skipped == N
        assert _shown(cat, "p3") == _outputs(back) == _outputs(first)

        unchanged = _judge(cat, tmp_path, "p4", _cfg(stub))
        assert unchanged.cache_hit and stub.chat_count == 2 * N


def test_a_cached_result_is_served_when_the_server_cannot_be_asked(
    cat: Catalog, tmp_path: Path
) -> None:
    with OllamaStub() as stub:
        first = _judge(cat, tmp_path, "s1", _cfg(stub))
        cfg = _cfg(stub)
    later = _judge(cat, tmp_path, "s2", cfg)  # the server is gone
    assert later.cache_hit and _outputs(later) == _outputs(first) == _shown(cat, "s2")


def test_resume_skips_only_rows_of_the_same_key(cat: Catalog, tmp_path: Path) -> None:
    with OllamaStub(fail_first=2) as stub:
        part = _judge(cat, tmp_path, "r1", _cfg(stub, retries=0, concurrency=1))
        assert part.out.n_failed == 2 and stub.chat_count == N
        resumed = _judge(cat, tmp_path, "r2", _cfg(stub, retries=0, concurrency=1))
        assert (resumed.out.n_sent, resumed.out.n_skipped) == (2, N - 2)
        other = _judge(cat, tmp_path, "r3", _cfg(stub, seed=1))
        assert (other.out.n_sent, other.out.n_skipped) == (N, 0)
        assert stub.chat_count == N + 2 + N
    failed = cat.query_df("SELECT count(*) AS n FROM judgments WHERE error IS NOT NULL")
    assert failed["n"][0] == 0  # the resumed key's failures were replaced


def test_a_new_reader_reads_stored_replies_again_without_asking(
    cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.eval.judge.settings as settings

    with OllamaStub() as stub:
        first = _judge(cat, tmp_path, "v1", _cfg(stub))
        monkeypatch.setattr(settings, "READER_VERSION", "a-later-reader")
        reread = _judge(cat, tmp_path, "v2", _cfg(stub))
        assert stub.chat_count == N  # nothing asked again
    assert reread.out.judge_keys != first.out.judge_keys
    assert (reread.out.n_reused, reread.out.n_sent) == (N, 0)
    assert _shown(cat, "v2") == [
        {**row, "judge_key": reread.out.judge_keys["llama3"]} for row in _outputs(first)
    ]
    raw = cat.query_df("SELECT judge_key, raw_reply FROM judgments ORDER BY judge_key, example_id")
    assert len(raw) == 2 * N
    by_key = {k: list(g["raw_reply"]) for k, g in raw.groupby("judge_key")}
    assert len(set(map(tuple, by_key.values()))) == 1  # the same replies under both keys


def test_judgments_without_a_key_are_still_shown_by_their_own_run(cat: Catalog) -> None:
    """Rows written before judge keys (or by the library directly) read as before."""
    rows = [{"example_id": i, "judge_model": "llama3", "prompt_version": "v2", "score": 10 * i}
            for i in range(N)]  # fmt: skip
    cat.replace_rows("judgments", rows, where={"run_id": "resp"})
    shown = cat.query_df("SELECT * FROM eval_summary WHERE run_id = 'resp'")
    assert shown["n"].tolist() == [N] and shown["mean_score"].tolist() == [20.0]
    assert pd.isna(shown["judge_key"][0])


def test_a_folder_from_before_judge_keys_replaces_only_rows_without_one(
    cat: Catalog, tmp_path: Path
) -> None:
    """Rebuilding a catalog replays stage folders in any order: an older judge folder
    (its scope recorded without judge_key) must not delete judgments that have a key."""
    from tasks.records.rows import RowSink, ingest, missing_tables

    with OllamaStub() as stub:
        keyed = _judge(cat, tmp_path, "k1", _cfg(stub))
    legacy = [{"run_id": "resp", "example_id": i, "judge_model": "llama3", "prompt_version": "v2",
               "repeat": 0, "score": 7, "raw_reply": "7"} for i in range(N)]  # fmt: skip
    sink = RowSink(tmp_path / "legacy")
    sink.add("judgments", legacy)
    meta = sink.write_parquet()
    meta["judgments"]["scopes"] = [{"run_id": "resp", "judge_model": "llama3", "prompt_version": "v2"}]  # fmt: skip
    assert missing_tables(cat, meta) == ["judgments"]
    ingest(cat, tmp_path / "legacy", meta)
    assert missing_tables(cat, meta) == []
    rows = cat.query_df(
        "SELECT coalesce(judge_key, 'none') AS k, count(*) AS n FROM judgments GROUP BY 1 ORDER BY 1"
    )
    assert rows.to_dict("list") == {"k": sorted([keyed.out.judge_keys["llama3"], "none"]),
                                    "n": [N, N]}  # fmt: skip
    assert _shown(cat, "k1") == _outputs(keyed)


def test_more_repeats_send_only_the_new_ones_and_each_run_shows_its_own(
    cat: Catalog, tmp_path: Path
) -> None:
    with OllamaStub() as stub:
        one = _judge(cat, tmp_path, "one", _cfg(stub, temperature=0.5))
        three = _judge(cat, tmp_path, "three", _cfg(stub, temperature=0.5, repeats=3))
        assert stub.chat_count == 3 * N  # repeat 0 reused, repeats 1 and 2 sent
        assert (three.out.n_reused, three.out.n_sent) == (N, 2 * N)
        two = _judge(cat, tmp_path, "two", _cfg(stub, temperature=0.5, repeats=2))
        assert stub.chat_count == 3 * N and two.out.n_reused == 2 * N
    for run, res, repeats in (("one", one, 1), ("three", three, 3), ("two", two, 2)):
        assert _shown(cat, run) == _outputs(res), run
        assert [r["n"] for r in _shown(cat, run)] == [N * repeats], run
    spread = cat.query_df("SELECT max(n_repeats) AS r FROM judge_spread WHERE run_id = 'two'")
    assert spread["r"][0] == 2
