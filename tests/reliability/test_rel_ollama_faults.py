"""The Ollama judge against a server that refuses, hangs, fails with 500s or answers
garbage: judge_run finishes with the failures counted (or raises a JudgeError before
sending anything), the stored responses are never touched, and a later run with a
healthy server judges exactly what is missing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from _rel_helpers import free_port

from benchmarks.ollama_stub import OllamaStub
from gpt.errors import JudgeError, OllamaUnreachableError

N = 6


@pytest.fixture
def catalog():
    from tasks.catalog import Catalog

    cat = Catalog()
    cat.replace_rows(
        "responses",
        [
            {
                "run_id": "r1",
                "example_id": i,
                "instruction": f"Say {i}",
                "input": "",
                "output": str(i),
                "response": f"{i}!",
                "new_tokens": 2,
                "seconds": 0.1,
            }
            for i in range(N)
        ],
        where={"run_id": "r1"},
    )
    return cat


def _cfg(host: str, **kw):
    from gpt.eval.judge.settings import JudgeConfig

    base = {
        "hosts": [host],
        "models": ["llama3"],
        "timeout_s": 2.0,
        "retries": 1,
        "backoff_s": 0.01,
        "concurrency": N,
    }
    return JudgeConfig(**{**base, **kw})


def _responses(cat) -> pd.DataFrame:
    return cat.query_df("SELECT * FROM responses ORDER BY example_id")


def _judgments(cat) -> pd.DataFrame:
    return cat.query_df("SELECT * FROM judgments ORDER BY example_id")


def _judge(cat, cfg):
    from tasks.stages.judge import judge_run

    return judge_run(cat, "r1", cfg, progress=False, save_every=2)


def test_connection_refused_raises_clearly_and_keeps_responses(catalog) -> None:
    before = _responses(catalog)
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OllamaUnreachableError) as info:
        _judge(catalog, _cfg(host))
    assert host in str(info.value) and "ollama serve" in str(info.value)
    pd.testing.assert_frame_equal(_responses(catalog), before)
    assert _judgments(catalog).empty


def test_hang_past_the_timeout_counts_failures(catalog) -> None:
    before = _responses(catalog)
    with OllamaStub(hang=True, hang_s=10) as stub:
        s = _judge(catalog, _cfg(stub.host, timeout_s=0.5, retries=1))
        assert stub.chat_count == 2 * N  # every example tried twice, none answered
    assert (s.n_sent, s.n_failed, s.n_scored) == (N, N, 0)
    j = _judgments(catalog)
    assert len(j) == N and j["score"].isna().all() and j["raw_reply"].isna().all()
    assert all("timed out" in e for e in j["error"])
    assert s.summary[0]["n_failed"] == N
    pd.testing.assert_frame_equal(_responses(catalog), before)


def test_persistent_500s_count_failures_then_resume(catalog) -> None:
    before = _responses(catalog)
    with OllamaStub(fail_first=10_000) as stub:
        s = _judge(catalog, _cfg(stub.host, retries=2))
        assert stub.chat_count == 3 * N
    assert (s.n_failed, s.n_scored) == (N, 0)
    assert all("500" in e or "terminated" in e for e in _judgments(catalog)["error"])
    # the server recovers: a rerun sends exactly the failed examples and scores them
    with OllamaStub(reply=lambda req: "87") as stub:
        s2 = _judge(catalog, _cfg(stub.host))
        assert stub.chat_count == N
    assert (s2.n_sent, s2.n_scored, s2.n_failed) == (N, N, 0)
    j = _judgments(catalog)
    assert len(j) == N and j["score"].tolist() == [87] * N and j["error"].isna().all()
    pd.testing.assert_frame_equal(_responses(catalog), before)


def test_transient_500s_are_retried(catalog) -> None:
    with OllamaStub(fail_first=3, reply=lambda req: "Score: 64") as stub:
        s = _judge(catalog, _cfg(stub.host, retries=1, concurrency=1))
        # one request at a time, two attempts each: example 0 meets failures 1 and 2
        # (given up), example 1 meets failure 3 and succeeds on its retry, the rest succeed
        assert stub.chat_count == 2 + 2 + (N - 2)
    assert (s.n_failed, s.n_scored) == (1, N - 1)
    assert _judgments(catalog)["score"].isna().sum() == 1


@pytest.mark.parametrize(
    "reply", ["", "I cannot judge this.", "Score: 150", "-5", "85.5", "\x00\ufffd\U0001f600"]
)
def test_garbage_replies_are_kept_unscored(catalog, reply: str) -> None:
    with OllamaStub(reply=lambda req: reply) as stub:
        s = _judge(catalog, _cfg(stub.host))
        assert stub.chat_count == N
    assert (s.n_scored, s.n_unparsed, s.n_failed) == (0, N, 0)
    j = _judgments(catalog)
    assert j["score"].isna().all() and j["error"].isna().all()
    assert j["raw_reply"].tolist() == [reply] * N  # kept verbatim for inspection


class _GarbageHTTP(BaseHTTPRequestHandler):
    """Lists the model like Ollama, but answers /api/chat with a non-JSON body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        return

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._send(
                200,
                b'{"models":[{"name":"llama3:latest","model":"llama3:latest"}]}',
                "application/json",
            )
        else:
            self._send(200, b"Ollama is running", "text/plain")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(200, b"<html>\x89PNG garbage {{{", "application/json")


@contextmanager
def garbage_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _GarbageHTTP)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_non_json_http_replies_count_as_failures(catalog) -> None:
    before = _responses(catalog)
    with garbage_server() as host:
        s = _judge(catalog, _cfg(host))
    assert (s.n_sent, s.n_failed, s.n_scored) == (N, N, 0)
    assert _judgments(catalog)["error"].notna().all()
    pd.testing.assert_frame_equal(_responses(catalog), before)


# --------------------------------------------------------------------------- required


@pytest.mark.parametrize("required", [False, True])
def test_judge_stage_unreachable_per_required(catalog, tmp_path, required: bool) -> None:
    """The pipeline's judge stage: Skipped with the exact fix (required=false), or a
    failed stage with that message (required=true); responses kept either way."""
    from gpt.eval.judge.settings import JudgeConfig
    from tasks.stages.contract import RunContext, StageSkipped
    from tasks.stages.judge import responses_input
    from tasks.stages.runner import run_stage

    before = _responses(catalog)
    ctx = RunContext(
        run_id="flow2",
        catalog_settings=catalog.settings,
        artifacts=str(tmp_path / "a"),
        datasets=str(tmp_path / "d"),
        progress=False,
    )
    resp = responses_input(catalog, "r1")
    cfg = JudgeConfig(
        required=required,
        hosts=[f"http://127.0.0.1:{free_port()}"],
        models=["llama3"],
        timeout_s=2.0,
        retries=0,
        concurrency=2,
    )
    if required:
        with pytest.raises(JudgeError):
            run_stage(ctx, "judge", cfg, extract_responses=resp)
        status = "failed"
    else:
        with pytest.raises(StageSkipped):
            run_stage(ctx, "judge", cfg, extract_responses=resp)
        status = "skipped"
    row = catalog.query_df("SELECT status, message FROM stages WHERE run_id = 'flow2'")
    assert row["status"].tolist() == [status]
    msg = row["message"][0]
    for fix in ("ollama serve", "ollama pull llama3", "gptflow rerun judge"):
        assert fix in msg, msg
    pd.testing.assert_frame_equal(_responses(catalog), before)
    assert _judgments(catalog).empty
