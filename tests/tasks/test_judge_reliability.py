"""Judge reliability: several judge models, repeats, several Ollama servers (one dying
mid-run), and the catalog's spread and agreement views — against loopback stand-ins."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmarks.ollama_stub import OllamaStub
from gpt.errors import OllamaUnreachableError
from gpt.eval.judge.hosts import preflight
from gpt.eval.judge.prompt import PROMPT_VERSION
from gpt.eval.judge.settings import JudgeConfig

N = 12


@pytest.fixture
def catalog(tmp_path: Path):
    from tasks.catalog import Catalog
    from tasks.stages.judge import import_responses

    cat = Catalog()
    records = [
        {"instruction": f"Task {i}.", "input": "", "output": f"out {i}", "model_response": f"r-{i}"}
        for i in range(N)
    ]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    import_responses(cat, "run", path)
    return cat


def _example(body: dict[str, Any]) -> int:
    return int(re.search(r"model response `r-(\d+)`", body["messages"][-1]["content"]).group(1))


def _cfg(hosts: list[str], **kw: Any) -> JudgeConfig:
    base = {"hosts": hosts, "backoff_s": 0.01, "timeout_s": 10.0, "retries": 1}
    return JudgeConfig(**{**base, **kw})


def _closed_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _judgments(cat) -> pd.DataFrame:
    return cat.query_df(
        'SELECT example_id, judge_model, "repeat", score, error, host, judge_key FROM judgments '
        "WHERE run_id = 'run' ORDER BY judge_model, \"repeat\", example_id"
    )


# --------------------------------------------------------------------------- views


def _expected_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import cohen_kappa_score

    bins = lambda s: np.minimum(np.floor(s / 10), 9).astype(int)  # noqa: E731
    return {
        "spearman": spearmanr(a, b).statistic,
        "kendall_tau": kendalltau(a, b).statistic,  # tau-b
        "qwk": cohen_kappa_score(bins(a), bins(b), labels=list(range(10)), weights="quadratic"),
    }


def test_spread_and_agreement_views_match_scipy_and_sklearn(catalog) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 101, N)
    scores = {  # three judges; ties, two repeats for one, a missing score for another
        "a": [truth, np.clip(truth + rng.integers(-8, 9, N), 0, 100)],
        "b": [np.clip(truth // 2 + 30 + rng.integers(-20, 21, N), 0, 100)],
        "c": [np.where(truth > 50, 90, 20)],
    }
    rows = []
    for judge, reps in scores.items():
        for rep, values in enumerate(reps):
            for i, v in enumerate(values):
                missing = judge == "b" and i == 3
                rows.append({
                    "example_id": i, "judge_model": judge, "prompt_version": PROMPT_VERSION,
                    "repeat": rep, "score": None if missing else int(v),
                    "error": "timed out" if missing else None,
                })  # fmt: skip
    catalog.replace_rows("judgments", rows, where={"run_id": "run"})

    spread = catalog.query_df(
        "SELECT * FROM judge_spread WHERE judge_model = 'a' ORDER BY example_id"
    )
    a_reps = np.stack(scores["a"]).astype(float)
    np.testing.assert_allclose(spread["mean_score"], a_reps.mean(axis=0))
    np.testing.assert_allclose(spread["stddev_score"], a_reps.std(axis=0, ddof=1))
    assert spread["range_score"].tolist() == (a_reps.max(0) - a_reps.min(0)).tolist()
    assert set(spread["n_repeats"]) == {2}

    got = catalog.query_df("SELECT * FROM judge_agreement ORDER BY judge_a, judge_b")
    assert list(zip(got["judge_a"], got["judge_b"], strict=True)) == [
        ("a", "b"), ("a", "c"), ("b", "c")
    ]  # fmt: skip
    means = {"a": a_reps.mean(axis=0), "b": scores["b"][0].astype(float), "c": scores["c"][0]}
    keep = np.arange(N) != 3  # b has no score for example 3
    for row in got.to_dict("records"):
        x, y = means[row["judge_a"]], means[row["judge_b"]]
        if "b" in (row["judge_a"], row["judge_b"]):
            x, y = x[keep], y[keep]
        assert row["n"] == len(x)
        for name, value in _expected_agreement(x, y).items():
            assert row[name] == pytest.approx(value, abs=1e-9), (row, name)
        assert row["mean_diff"] == pytest.approx(float(np.mean(x - y)))


def test_agreement_of_constant_judges_is_null_not_nan(catalog) -> None:
    rows = [
        {"example_id": i, "judge_model": m, "prompt_version": PROMPT_VERSION, "score": 50}
        for i in range(4)
        for m in ("a", "b")
    ]
    catalog.replace_rows("judgments", rows, where={"run_id": "run"})
    row = catalog.query_df("SELECT * FROM judge_agreement").iloc[0]
    assert row["n"] == 4 and row["mean_abs_diff"] == 0
    assert pd.isna(row["spearman"]) and pd.isna(row["kendall_tau"]) and pd.isna(row["qwk"])


# --------------------------------------------------------------------------- models, repeats


def test_two_judges_on_two_servers_with_repeats(catalog) -> None:
    """Two stand-in servers, each holding one judge model that scores differently (and,
    for the second, differently per repeat seed): every judgment stored, each request
    routed to the server holding its model, spread and agreement in the catalog."""
    from tasks.stages.judge import judge_run

    def strict(body: dict[str, Any]) -> dict[str, Any]:
        return {"score": 8 * _example(body), "reason": "strict"}

    def lenient(body: dict[str, Any]) -> dict[str, Any]:
        i, seed = _example(body), body["options"]["seed"]
        return {"score": min(100, 40 + 5 * i + (seed - 123) * (i % 3))}

    with (
        OllamaStub(models=["llama3"], reply=strict) as a,
        OllamaStub(models=["mistral"], reply=lenient) as b,
    ):
        first = judge_run(catalog, "run", _cfg([a.host, b.host]), progress=False)
        assert (first.n_sent, first.n_scored) == (N, N)
        # a second judge and a second repeat: only the new judgments are sent
        cfg = _cfg([a.host, b.host], models=["llama3", "mistral"], repeats=2)
        both = judge_run(catalog, "run", cfg, progress=False)
        assert {r["model"] for r in a.chat_requests()} == {"llama3"}
        assert {r["model"] for r in b.chat_requests()} == {"mistral"}
        assert (a.answered, b.answered) == (2 * N, 2 * N)
    # llama3's repeat 0 is reused (another repeats count: another judge key), not sent
    assert (both.n_sent, both.n_reused, both.n_scored, both.n_failed) == (3 * N, N, 3 * N, 0)

    j = _judgments(catalog)
    j = j[j.judge_key.isin(list(both.judge_keys.values()))]  # the second call's keys
    assert len(j) == 4 * N and j["error"].isna().all()
    assert not j.duplicated(["example_id", "judge_model", "repeat"]).any()
    assert set(j[j.judge_model == "llama3"]["host"]) == {a.host}

    spread = catalog.query_df(
        "SELECT judge_model, example_id, stddev_score, range_score FROM judge_spread "
        "WHERE run_id = 'run' ORDER BY judge_model, example_id"
    )
    strict_rows = spread[spread.judge_model == "llama3"]
    lenient_rows = spread[spread.judge_model == "mistral"]
    assert (strict_rows["range_score"] == 0).all()  # the same score on both repeats
    assert lenient_rows["range_score"].tolist() == [i % 3 for i in range(N)]

    # no judge stage row speaks for run 'run': the views show each of its judge keys apart
    agreement = catalog.query_df("SELECT * FROM judge_agreement WHERE run_id = 'run'")
    assert len(agreement) == 2  # llama3 under repeats 1 and 2, each against mistral
    (agreement,) = agreement[agreement.key_a == both.judge_keys["llama3"]].to_dict("records")
    assert (agreement["judge_a"], agreement["judge_b"], agreement["n"]) == ("llama3", "mistral", N)
    x = j[j.judge_model == "llama3"].groupby("example_id")["score"].mean().to_numpy()
    y = j[j.judge_model == "mistral"].groupby("example_id")["score"].mean().to_numpy()
    for name, value in _expected_agreement(x, y).items():
        assert agreement[name] == pytest.approx(value, abs=1e-9)
    assert [r["judge_model"] for r in both.summary] == ["llama3", "mistral"]
    assert [r["repeats"] for r in both.summary] == [2, 2]


# --------------------------------------------------------------------------- hosts


def test_requests_spread_over_hosts_with_bounded_concurrency(catalog) -> None:
    from tasks.stages.judge import judge_run

    stubs = [OllamaStub(latency_s=0.05).start() for _ in range(3)]
    try:
        cfg = _cfg([s.host for s in stubs], concurrency=2, repeats=2)
        result = judge_run(catalog, "run", cfg, progress=False)
    finally:
        for s in stubs:
            s.stop()
    assert (result.n_sent, result.n_scored) == (2 * N, 2 * N)
    assert all(s.answered > 0 for s in stubs)  # every host took a share
    assert sum(s.answered for s in stubs) == 2 * N
    assert all(s.max_in_flight <= 2 for s in stubs)  # at most `concurrency` per host
    assert max(s.max_in_flight for s in stubs) == 2


def test_host_killed_mid_run_every_item_scored_once(catalog) -> None:
    """One of three servers dies (socket closed, in-flight requests dropped) after a few
    requests: its requests go to the others; each (example, model, repeat) is stored once,
    scored, with no error."""
    from tasks.stages.judge import judge_run

    live = [OllamaStub(latency_s=0.05).start() for _ in range(2)]
    dying = OllamaStub(latency_s=0.05, die_after=3).start()
    stubs = [live[0], dying, live[1]]
    try:
        cfg = _cfg([s.host for s in stubs], concurrency=2, repeats=2, retries=0)
        result = judge_run(catalog, "run", cfg, progress=False, save_every=4)
    finally:
        for s in stubs:
            s.stop()
    assert dying.killed.is_set()
    assert (result.n_sent, result.n_scored, result.n_failed) == (2 * N, 2 * N, 0)
    assert [d.split(": ")[0] for d in result.hosts_down] == [dying.host]

    j = _judgments(catalog)
    assert len(j) == 2 * N and j["score"].notna().all() and j["error"].isna().all()
    assert not j.duplicated(["example_id", "judge_model", "repeat"]).any()
    per_host = j["host"].value_counts().to_dict()
    for s in live:  # every reply a live host wrote is a stored judgment, and only those
        assert per_host.get(s.host, 0) == s.answered
    assert per_host.get(dying.host, 0) <= dying.answered <= 3


def test_last_host_dying_fails_the_rest_then_a_rerun_completes(catalog) -> None:
    from tasks.stages.judge import judge_run

    with OllamaStub(die_after=4) as dying:
        cfg = _cfg([dying.host], concurrency=1, retries=5, dead_after=2)
        first = judge_run(catalog, "run", cfg, progress=False)
        # dead after 2 connection errors: the rest fail at once instead of 6 tries each
        assert dying.chat_count == 5
    assert first.n_scored == 4 and first.n_failed == N - 4
    errors = _judgments(catalog)["error"].dropna()
    assert errors.str.contains("no live judge host serves 'llama3'").all()

    with OllamaStub() as fresh:
        second = judge_run(catalog, "run", _cfg([fresh.host]), progress=False)
        assert fresh.chat_count == N - 4
    assert (second.n_sent, second.n_scored, second.n_skipped) == (N - 4, N - 4, 4)


def test_preflight_passes_on_one_host_and_names_the_others(catalog) -> None:
    from tasks.stages.judge import judge_run

    down = _closed_url()
    with OllamaStub(models=["llama3"]) as up, OllamaStub(models=["phi3"]) as other:
        statuses = preflight(_cfg([down, up.host, other.host]), progress=False)
        assert [(s.url, s.up, s.models) for s in statuses] == [
            (down, False, ()), (up.host, True, ("llama3",)), (other.host, True, ())
        ]  # fmt: skip
        assert statuses[2].missing == ("llama3",)
        result = judge_run(catalog, "run", _cfg([down, up.host, other.host]), progress=False)
        assert other.chat_count == 0  # lacks the model: not used
    assert result.n_scored == N
    assert len(result.hosts_down) == 1 and result.hosts_down[0].startswith(f"{down}: ")

    down2 = _closed_url()
    with pytest.raises(OllamaUnreachableError) as info:
        preflight(_cfg([down, down2]), progress=False)
    msg = str(info.value)
    assert "not reachable at any judge host" in msg and down in msg and down2 in msg
    assert "ollama serve" in msg
