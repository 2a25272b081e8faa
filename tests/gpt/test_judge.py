"""The Ollama judge, driven through the real ``ollama`` client against a loopback stub."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from benchmarks.ollama_stub import OllamaStub
from gpt.errors import DataError, ModelNotPulledError, OllamaUnreachableError
from gpt.eval.judge.hosts import preflight
from gpt.eval.judge.prompt import PROMPT_VERSION, REPLY_SCHEMA, build_prompt
from gpt.eval.judge.reply import parse_reply, parse_score
from gpt.eval.judge.scoring import score_examples
from gpt.eval.judge.settings import JudgeConfig

# --------------------------------------------------------------------------- helpers

#: The reply the stub gives for each example's response text (``resp-<i>``).
REPLIES = [
    "85",
    "Score: 40/100",
    "72",
    "I would rate this 13.",
    "100",
    "0",
    "55",
    "91",
    "The response is good. 64",
    "7",
]


def _records(n: int) -> list[dict[str, Any]]:
    """Alpaca-style records; every third has an empty input, one has no input key."""
    recs = []
    for i in range(n):
        rec = {
            "instruction": f"Rewrite sentence number {i} in passive voice.",
            "input": "" if i % 3 == 0 else f"The cat chased mouse {i}.",
            "output": f"Mouse {i} was chased by the cat.",
            "model_response": f"resp-{i}",
        }
        if i == 4:
            del rec["input"]
        recs.append(rec)
    return recs


def _examples(n: int) -> list[dict[str, Any]]:
    return [
        {"example_id": i, **{k: v for k, v in r.items() if k != "model_response"}}
        | {"response": r["model_response"]}
        for i, r in enumerate(_records(n))
    ]


def _reply_from_table(table: list):
    """Stub reply function: find ``resp-<i>`` in the prompt and answer ``table[i]``."""

    def reply(body: dict[str, Any]) -> Any:
        content = body["messages"][-1]["content"]
        i = int(re.search(r"model response `resp-(\d+)`", content).group(1))
        return table[i]

    return reply


def _write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def catalog():
    from tasks.catalog import Catalog

    return Catalog()  # GPTFLOW_DB points into tmp_path (conftest)


def _cfg(host: str, **kw: Any) -> JudgeConfig:
    kw.setdefault("backoff_s", 0.01)
    return JudgeConfig(hosts=[host], **kw)


# --------------------------------------------------------------------------- pure parts


def test_prompt_template_formats_alpaca_and_asks_for_json() -> None:
    with_input = build_prompt("Sort the list.", "3, 1, 2", "1, 2, 3", "1 2 3")
    assert "### Instruction:\nSort the list." in with_input
    assert "### Input:\n3, 1, 2" in with_input
    assert "correct output `1, 2, 3`" in with_input
    assert "model response `1 2 3`" in with_input
    assert "0 to 100" in with_input
    assert with_input.endswith(
        'Answer with a JSON object: {"score": <integer from 0 to 100>, '
        '"reason": "<one short sentence>"}.'
    )
    assert "### Input:" not in build_prompt("Say hi.", "", "hi", "hi")
    assert re.fullmatch(r"v\d+", PROMPT_VERSION)


def test_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    cfg = JudgeConfig()
    assert cfg.hosts == ("http://localhost:11434",)
    assert cfg.options() == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert cfg.options(repeat=2)["seed"] == 125
    assert (cfg.models, cfg.repeats, cfg.structured) == (("llama3",), 1, True)
    assert (cfg.concurrency, cfg.auto_pull) == (4, False)
    monkeypatch.setenv("OLLAMA_HOST", "http://judge.example:1234")
    assert JudgeConfig().hosts == ("http://judge.example:1234",)


def test_config_lists_one_name_and_old_keys() -> None:
    from gpt.config import ArgsError

    assert JudgeConfig(models="phi3").models == ("phi3",)  # --set judge.models=phi3
    assert JudgeConfig(models=["a", "b"]).model_dump(mode="json")["models"] == ["a", "b"]
    # one name per setting: the old names fail, naming the new one
    for old_name, new_name in (("host", "hosts"), ("model", "models")):
        with pytest.raises(ArgsError, match=rf"{old_name}: renamed to {new_name}"):
            JudgeConfig.model_validate({old_name: "x"})
    # a config stored by an older gptflow (runs.config, read by `gptflow rerun`) is upgraded
    old = JudgeConfig.model_validate(JudgeConfig.upgrade({"host": "http://h:1", "model": "m"}))
    assert (old.hosts, old.models) == (("http://h:1",), ("m",))
    with pytest.raises(ArgsError, match="distinct"):
        JudgeConfig(models=["a", "a"])
    with pytest.raises(ArgsError, match="hosts"):
        JudgeConfig(hosts=[])


# --------------------------------------------------------------------------- settings


def _another(value: Any) -> Any:
    """A valid value other than ``value`` (by its type)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple):
        return (*value, "phi3")
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    raise TypeError(f"no other value for {value!r}")


def _sent(stub: OllamaStub, cfg: JudgeConfig) -> list[str]:
    """The chat request bodies ``cfg`` makes the library send (canonical, sorted)."""
    before = len(stub.chat_requests())
    out = score_examples(_examples(2), cfg, progress=False)
    assert all(j.error is None for j in out)
    bodies = stub.chat_requests()[before:]
    return sorted(json.dumps({k: v for k, v in b.items() if k != "stream"}, sort_keys=True)
                  for b in bodies)  # fmt: skip


#: The settings that shape a reply: every field the cache key holds.
SHAPING = sorted(set(JudgeConfig().key_dict()) & set(JudgeConfig.model_fields))
#: The others, except where the requests go (and the one that makes the preflight pull).
OPERATIONAL = sorted(JudgeConfig.operational_fields() - {"hosts", "auto_pull"})


@pytest.mark.parametrize("field", [*SHAPING, "prompt"])
def test_each_setting_that_shapes_a_reply_changes_what_reaches_the_server(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observed at the loopback server: a non-default value of each setting in the judge
    key changes the requests (not only the settings object handed over), and the key."""
    import gpt.eval.judge.prompt as prompt

    with OllamaStub(models=["llama3", "phi3"]) as stub:
        base = _cfg(stub.host)
        before = base.judge_key("llama3", "d").key
        sent = _sent(stub, base)
        if field == "prompt":
            monkeypatch.setattr(prompt, "PROMPT_TEMPLATE", "Be strict. " + prompt.PROMPT_TEMPLATE)
            changed = base
        else:
            changed = base.replace(**{field: _another(getattr(base, field))})
        assert _sent(stub, changed) != sent, f"{field} does not change what is sent"
    if field != "models":  # another model: the same key for llama3, one more for phi3
        assert changed.judge_key("llama3", "d").key != before, field
    assert len(SHAPING) >= 6  # models, repeats, seed, temperature, num_ctx, structured


@pytest.mark.parametrize("field", OPERATIONAL)
def test_operational_settings_leave_the_requests_alone(field: str) -> None:
    with OllamaStub() as stub:
        base = _cfg(stub.host)
        changed = base.replace(**{field: _another(getattr(base, field))})
        assert _sent(stub, changed) == _sent(stub, base), field
    assert changed.judge_key("llama3", "d") == base.judge_key("llama3", "d")


def test_the_judge_key_holds_the_model_digest() -> None:
    cfg = JudgeConfig()
    a, b = cfg.judge_key("llama3", "sha256:aa"), cfg.judge_key("llama3", "sha256:bb")
    assert a.key != b.key and a.settings["model_digest"] == "sha256:aa"
    assert cfg.judge_key("mistral", "sha256:aa").key != a.key
    # the settings by name: everything the stage key holds, each model apart
    shared = set(cfg.key_dict()) - {"models"}
    assert set(a.settings) == {"model", "model_digest", *shared}


# --------------------------------------------------------------------------- catalog flow


#: What the stub's model means for each ``resp-<i>``: sent as JSON when asked (``format``).
VERDICTS = [{"score": s, "reason": f"Reason {i}."} for i, s in enumerate(
    [85, 40, 72, 13, 100, 0, 55, 91, 64, 7])]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_scores_parsed_and_aggregated(catalog, tmp_path: Path, stream: bool) -> None:
    from tasks.stages.judge import import_responses, judge_run, summarize

    n = len(VERDICTS)
    path = _write_json(tmp_path / "resp.json", _records(n))
    assert import_responses(catalog, "r1", path) == n
    with OllamaStub(reply=_reply_from_table(VERDICTS)) as stub:
        result = judge_run(catalog, "r1", _cfg(stub.host, stream=stream), progress=False)
        bodies = stub.chat_requests()

    expected = [v["score"] for v in VERDICTS]
    assert (result.n_sent, result.n_scored, result.n_failed, result.n_skipped) == (n, n, 0, 0)
    # Every request carried the options, the stream flag and the reply's JSON schema.
    assert len(bodies) == n
    assert all(b["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048} for b in bodies)
    assert all(b["stream"] is stream and b["model"] == "llama3" for b in bodies)
    assert all(b["format"] == REPLY_SCHEMA for b in bodies)

    rows = catalog.query_df(
        "SELECT example_id, score, raw_reply, parse_rule, judge_model, prompt_version, error, "
        "host FROM judgments WHERE run_id = 'r1' ORDER BY example_id"
    )
    assert rows["score"].tolist() == expected
    assert [json.loads(r) for r in rows["raw_reply"]] == VERDICTS  # kept verbatim
    assert set(rows["parse_rule"]) == {"json"}
    assert set(rows["judge_model"]) == {"llama3"}
    assert set(rows["prompt_version"]) == {PROMPT_VERSION}
    assert set(rows["host"]) == {stub.host}
    assert rows["error"].isna().all()

    summary = summarize(catalog, "r1").iloc[0]
    assert (summary["n"], summary["n_scored"], summary["n_failed"]) == (n, n, 0)
    assert summary["mean_score"] == pytest.approx(statistics.mean(expected))
    assert summary["median_score"] == pytest.approx(statistics.median(expected))
    assert (summary["min_score"], summary["max_score"]) == (min(expected), max(expected))
    assert result.summary[0]["mean_score"] == pytest.approx(statistics.mean(expected))


@pytest.mark.parametrize("structured", [False, True])
def test_free_text_replies_are_read_by_the_fallback(
    catalog, tmp_path: Path, structured: bool
) -> None:
    """With ``structured`` off no ``format`` is sent; a model that ignores it (the stub's
    free-text replies) is read by the text rules either way."""
    from tasks.stages.judge import import_responses, judge_run

    n = len(REPLIES)
    import_responses(catalog, "ft", _write_json(tmp_path / "r.json", _records(n)))
    with OllamaStub(reply=_reply_from_table(REPLIES)) as stub:
        result = judge_run(catalog, "ft", _cfg(stub.host, structured=structured), progress=False)
        bodies = stub.chat_requests()
    assert all(("format" in b) is structured for b in bodies)
    rows = catalog.query_df(
        "SELECT score, raw_reply, parse_rule FROM judgments WHERE run_id = 'ft' ORDER BY example_id"
    )
    assert rows["raw_reply"].tolist() == REPLIES
    assert rows["score"].tolist() == [parse_score(r) for r in REPLIES]
    assert rows["parse_rule"].tolist() == [parse_reply(r).rule for r in REPLIES]
    assert result.n_scored == n


def test_malformed_replies_give_null_score_and_keep_raw(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    replies = ["excellent work", "105", "Score: 85/100", "-3", "85.5", "70"]
    import_responses(catalog, "bad", _write_json(tmp_path / "r.json", _records(len(replies))))
    with OllamaStub(reply=_reply_from_table(replies)) as stub:
        result = judge_run(catalog, "bad", _cfg(stub.host), progress=False)
        # A deterministic (seed, temperature 0) judge would repeat an unparsable reply:
        # such rows count as judged and a rerun does not send them again.
        again = judge_run(catalog, "bad", _cfg(stub.host), progress=False)
        assert stub.chat_count == len(replies)
    assert (result.n_scored, result.n_unparsed, result.n_failed) == (2, 4, 0)
    assert (again.n_sent, again.n_skipped) == (0, len(replies))

    ex = catalog.query_df(
        "SELECT example_id, score, raw_reply, response FROM eval_examples "
        "WHERE run_id = 'bad' ORDER BY example_id"
    )
    assert len(ex) == len(replies)  # nothing dropped
    assert ex["raw_reply"].tolist() == replies
    assert [None if pd.isna(s) else int(s) for s in ex["score"]] == [None, None, 85, None, None, 70]
    summary = catalog.query_df("SELECT * FROM eval_summary WHERE run_id = 'bad'").iloc[0]
    assert (summary["n"], summary["n_scored"], summary["n_unparsed"]) == (6, 2, 4)
    assert summary["n_failed"] == 0  # every request was answered
    assert summary["mean_score"] == pytest.approx((85 + 70) / 2)


def test_model_not_pulled_gives_clear_message(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    import_responses(catalog, "np", _write_json(tmp_path / "r.json", _records(3)))
    with OllamaStub(models=["mistral"]) as stub:
        with pytest.raises(ModelNotPulledError) as info:
            judge_run(catalog, "np", _cfg(stub.host), progress=False)
        assert stub.chat_requests() == []  # preflight stopped before any scoring
        show = [r for r in stub.requests if r.path == "/api/show"]
        assert show and show[0].body == {"model": "llama3"}
    assert (
        "model 'llama3' is not pulled — run `ollama pull llama3` (or set judge.auto_pull)"
        in str(info.value)
    )
    assert catalog.query_df("SELECT count(*) AS c FROM judgments")["c"].item() == 0


def test_server_down_clear_error_and_responses_intact(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    import_responses(catalog, "down", _write_json(tmp_path / "r.json", _records(4)))
    host = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(OllamaUnreachableError) as info:
        judge_run(catalog, "down", _cfg(host), progress=False)
    assert f"Ollama is not reachable at {host} — start it with `ollama serve`" in str(info.value)
    stored = catalog.query_df(
        "SELECT example_id, response FROM responses WHERE run_id = 'down' ORDER BY example_id"
    )
    assert stored["response"].tolist() == [f"resp-{i}" for i in range(4)]
    assert catalog.query_df("SELECT count(*) AS c FROM judgments")["c"].item() == 0


def test_500_then_success_is_retried(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    import_responses(catalog, "flaky", _write_json(tmp_path / "r.json", _records(3)))
    with OllamaStub(reply=_reply_from_table(REPLIES), fail_first=2) as stub:
        result = judge_run(catalog, "flaky", _cfg(stub.host, concurrency=1), progress=False)
        assert stub.chat_count == 3 + 2  # two 500s, then every example once
    assert (result.n_scored, result.n_failed) == (3, 0)
    scores = catalog.query_df("SELECT score FROM judgments ORDER BY example_id")["score"]
    assert scores.tolist() == [parse_score(r) for r in REPLIES[:3]]


def test_4xx_is_not_retried_and_failure_is_recorded() -> None:
    # Scoring without preflight against a server lacking the model: 404 on each request.
    with OllamaStub(models=[]) as stub:
        out = score_examples(_examples(2), _cfg(stub.host, retries=3), progress=False)
        assert stub.chat_count == 2  # one request each, no retry on 404
    assert [j.score for j in out] == [None, None]
    assert all("not found, try pulling it first" in j.error for j in out)
    assert all("404" in j.error for j in out)


def test_timeout_is_retried_then_recorded() -> None:
    with OllamaStub(hang=True, hang_s=5) as stub:
        t0 = time.perf_counter()
        out = score_examples(
            _examples(1), _cfg(stub.host, timeout_s=0.3, retries=1), progress=False
        )
        elapsed = time.perf_counter() - t0
        assert stub.chat_count == 2
    assert out[0].score is None and out[0].raw_reply is None
    assert "timed out" in out[0].error
    assert elapsed < 3


def test_rerun_scores_only_missing(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    n = 6
    import_responses(catalog, "rr", _write_json(tmp_path / "r.json", _records(n)))
    # First pass: concurrency 1 and no retries, the first 2 requests get a 500.
    with OllamaStub(reply=_reply_from_table(REPLIES), fail_first=2) as stub:
        first = judge_run(catalog, "rr", _cfg(stub.host, concurrency=1, retries=0), progress=False)
    assert (first.n_sent, first.n_scored, first.n_failed) == (n, n - 2, 2)
    failed = catalog.query_df(
        "SELECT example_id, error FROM judgments WHERE score IS NULL ORDER BY example_id"
    )
    assert len(failed) == 2 and failed["error"].str.contains("500").all()

    with OllamaStub(reply=_reply_from_table(REPLIES)) as stub:
        second = judge_run(catalog, "rr", _cfg(stub.host), progress=False)
        sent = sorted(
            int(re.search(r"resp-(\d+)", b["messages"][-1]["content"]).group(1))
            for b in stub.chat_requests()
        )
    assert sent == failed["example_id"].tolist()
    assert (second.n_sent, second.n_skipped, second.n_failed) == (2, n - 2, 0)
    rows = catalog.query_df("SELECT example_id, score, error FROM judgments ORDER BY example_id")
    assert len(rows) == n  # upserted, not duplicated
    assert rows["score"].tolist() == [parse_score(r) for r in REPLIES[:n]]
    assert rows["error"].isna().all()

    with OllamaStub() as stub:  # nothing left: only the preflight's listing (the digest)
        third = judge_run(catalog, "rr", _cfg(stub.host), progress=False)
        assert [r.path for r in stub.requests] == ["/api/tags"]
    assert third.n_sent == 0 and third.summary[0]["n_scored"] == n

    # A different judge model is a separate set of judgments.
    with OllamaStub(models=["llama3", "phi3"]) as stub:
        other = judge_run(catalog, "rr", _cfg(stub.host, models=["phi3"]), progress=False)
        assert stub.chat_count == n
    assert other.n_sent == n


def test_concurrency_speedup() -> None:
    n = 16
    examples = _examples(n)
    with OllamaStub(latency_s=0.2) as stub:
        times = {}
        for conc in (1, 8):
            t0 = time.perf_counter()
            out = score_examples(examples, _cfg(stub.host, concurrency=conc), progress=False)
            times[conc] = time.perf_counter() - t0
            assert all(j.score is not None and j.error is None for j in out)
    ratio = times[1] / times[8]
    print(
        f"\njudge concurrency 1: {times[1]:.2f}s, 8: {times[8]:.2f}s "
        f"for {n} requests at 200 ms -> speedup {ratio:.1f}x"
    )
    assert times[1] >= n * 0.2
    assert ratio >= 3.0


def test_auto_pull_pulls_through_api(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    import_responses(catalog, "pull", _write_json(tmp_path / "r.json", _records(2)))
    with OllamaStub(models=[], pullable=["llama3"], reply=_reply_from_table(REPLIES)) as stub:
        result = judge_run(catalog, "pull", _cfg(stub.host, auto_pull=True), progress=False)
        pulls = [r.body for r in stub.requests if r.path == "/api/pull"]
    assert pulls == [{"model": "llama3", "insecure": False, "stream": True}]
    assert stub.pulled == ["llama3"]
    assert result.n_scored == 2

    with OllamaStub(models=[], pullable=[]) as stub, pytest.raises(ModelNotPulledError) as info:
        preflight(_cfg(stub.host, models=["nosuch"], auto_pull=True), progress=False)
    assert "pulling model 'nosuch'" in str(info.value)
    assert "file does not exist" in str(info.value)


def test_sync_wrapper_inside_running_loop() -> None:
    with OllamaStub(reply=_reply_from_table(REPLIES)) as stub:

        async def main() -> list:
            return score_examples(_examples(3), _cfg(stub.host), progress=False)

        out = asyncio.run(main())
    assert [j.score for j in out] == [parse_score(r) for r in REPLIES[:3]]


def test_import_responses_validation(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses

    recs = _records(3)
    del recs[1]["model_response"]
    with pytest.raises(DataError, match=r"record 1: field 'model_response' is missing"):
        import_responses(catalog, "v", _write_json(tmp_path / "a.json", recs))
    recs = _records(3)
    recs[2]["output"] = 5
    with pytest.raises(DataError, match=r"record 2: field 'output' must be a string"):
        import_responses(catalog, "v", _write_json(tmp_path / "b.json", recs))
    (tmp_path / "c.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"c.json must hold a JSON list"):
        import_responses(catalog, "v", tmp_path / "c.json")
    (tmp_path / "d.json").write_text("[{")
    with pytest.raises(DataError, match=r"d.json is not valid JSON"):
        import_responses(catalog, "v", tmp_path / "d.json")
    # A custom response key works.
    recs = [{**r, "answer": r.pop("model_response")} for r in _records(2)]
    assert import_responses(catalog, "v", _write_json(tmp_path / "e.json", recs), "answer") == 2


def test_reimport_changed_response_drops_its_judgment(catalog, tmp_path: Path) -> None:
    from tasks.stages.judge import import_responses, judge_run

    recs = _records(3)
    import_responses(catalog, "ch", _write_json(tmp_path / "r.json", recs))
    with OllamaStub(reply=_reply_from_table(REPLIES)) as stub:
        judge_run(catalog, "ch", _cfg(stub.host), progress=False)
        recs[1]["model_response"] = "resp-5"  # a different answer for example 1
        import_responses(catalog, "ch", _write_json(tmp_path / "r.json", recs))
        again = judge_run(catalog, "ch", _cfg(stub.host), progress=False)
        assert stub.chat_count == 3 + 1
    assert again.n_sent == 1
    scores = catalog.query_df("SELECT score FROM judgments ORDER BY example_id")["score"]
    assert scores.tolist() == [parse_score(REPLIES[i]) for i in (0, 5, 2)]


# --------------------------------------------------------------------------- CLI


def test_cli_judge_and_evals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    n = 8
    path = _write_json(tmp_path / "my-responses.json", _records(n))
    expected = [parse_score(r) for r in REPLIES[:n]]
    with OllamaStub(reply=_reply_from_table(REPLIES)) as stub:
        rc = main(["judge", "--responses", str(path), "--host", stub.host, "--no-progress"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert stub.chat_count == n
    assert "run 'judge-my-responses'" in out
    assert f"{statistics.mean(expected):.6g}" in out  # the eval_summary row

    rc = main(["evals", "--run", "judge-my-responses", "--worst", "3", "--format", "json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    (summary,) = data["summary"]
    assert summary["n"] == n and summary["n_scored"] == n
    assert summary["mean_score"] == pytest.approx(statistics.mean(expected))
    assert summary["median_score"] == pytest.approx(statistics.median(expected))
    assert [e["score"] for e in data["examples"]] == sorted(expected)[:3]
    worst = min(range(n), key=lambda i: expected[i])
    assert data["examples"][0]["response"] == f"resp-{worst}"

    rc = main(["evals", "--format", "table"])
    text = capsys.readouterr().out
    assert rc == 0 and "eval_summary" in text and f"({n} rows)" in text

    host = f"http://127.0.0.1:{_closed_port()}"
    rc = main(["judge", "--responses", str(path), "--run", "x", "--host", host, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "gptflow judge: error: Ollama is not reachable at" in err


def test_eval_summary_separates_unparsed_from_failed(catalog) -> None:
    """A reply without a score is not a failed request (observation 2 of issue 12)."""
    rows = [
        {"example_id": 0, "score": 80, "raw_reply": '{"score": 80}', "error": None},
        {"example_id": 1, "score": None, "raw_reply": "I cannot judge this.", "error": None},
        {"example_id": 2, "score": None, "raw_reply": "70 or 80", "error": None},
        {"example_id": 3, "score": None, "raw_reply": None, "error": "timed out (attempt 2/2)"},
    ]
    catalog.replace_rows(
        "judgments",
        [{**r, "judge_model": "llama3", "prompt_version": PROMPT_VERSION} for r in rows],
        where={"run_id": "s"},
    )
    row = catalog.query_df("SELECT * FROM eval_summary WHERE run_id = 's'").iloc[0]
    assert (row["n"], row["n_scored"], row["n_unparsed"], row["n_failed"]) == (4, 1, 2, 1)


# --------------------------------------------------------------------------- the stand-in


def test_the_stand_in_runs_on_its_own_and_scores_by_a_hash_of_the_request(
    tmp_path: Path,
) -> None:
    """`python -m benchmarks.ollama_stub --port N` serves until stopped (as docs/evaluation.md
    says), reports a digest per model, and scores a request by a hash of what shapes a
    reply: the same request, the same score; another temperature, another score."""
    import os
    import signal
    import subprocess
    import sys

    import ollama

    from gpt.paths import project_root

    port = _closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ollama_stub", "--port", str(port), "--model", "phi3"],
        cwd=project_root(),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # printed once it listens
        assert f"http://127.0.0.1:{port}" in line and "phi3:latest" in line, line
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        (model,) = client.list().models
        assert model.model == "phi3:latest" and re.fullmatch(r"[0-9a-f]{64}", model.digest)

        def score(**options: Any) -> int:
            msg = [{"role": "user", "content": "Rate: 2 + 2 = 4"}]
            reply = client.chat(model="phi3", messages=msg, options=options, format=REPLY_SCHEMA)
            return json.loads(reply.message.content)["score"]

        greedy = score(temperature=0, seed=1)
        assert score(temperature=0, seed=2) == greedy  # greedy decoding ignores the seed
        others = {score(temperature=t, seed=1) for t in (0.3, 0.6, 0.9)}
        assert others - {greedy}, "the temperature never changed the score"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_the_stand_in_repull_changes_the_digest_and_the_scores() -> None:
    import ollama

    with OllamaStub(models=["llama3"]) as stub:
        cfg = _cfg(stub.host)
        before = [j.score for j in score_examples(_examples(6), cfg, progress=False)]
        digest = stub.digest("llama3")
        stub.repull("llama3")
        listed = {m.model: m.digest for m in ollama.Client(host=stub.host).list().models}
        after = [j.score for j in score_examples(_examples(6), cfg, progress=False)]
    assert listed["llama3:latest"] != digest
    assert after != before and all(s is not None for s in before + after)
