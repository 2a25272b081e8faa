"""A loopback HTTP server speaking the slice of the Ollama REST API gptflow uses.

It answers the real ``ollama`` Python client exactly as an Ollama server would:

- ``GET /``            → ``Ollama is running``
- ``GET /api/tags``    → ``{"models": [{"name", "model", "modified_at", "size", "digest", "details"}]}``
- ``POST /api/show``   → model details, or 404 ``{"error": "model 'X' not found"}``
- ``POST /api/chat``   → one JSON body (``"stream": false``) or NDJSON chunks ending with a
  ``"done": true`` line; a missing model gives 404
  ``{"error": "model \"X\" not found, try pulling it first"}``. With ``format`` (a JSON
  schema or ``"json"``) the reply content is JSON, as Ollama's structured output makes it.
- ``POST /api/pull``   → NDJSON status lines (manifest, per-layer progress, ``success``),
  after which the model is listed; an unknown model streams
  ``{"error": "pull model manifest: file does not exist"}``

Knobs: the models present (each with a digest, listed by ``/api/tags``;
:meth:`OllamaStub.repull` gives a model a new digest, as ``ollama pull`` of a changed
model does), the models pullable, a reply function, a fixed latency per chat request,
failing the first N chat requests with 500, hanging, dying (listening socket and open
connections closed) after N chat requests, or :meth:`OllamaStub.kill`. Every request is
logged in :attr:`OllamaStub.requests`; counters: ``chat_count`` (chat requests
received), ``answered`` (replies written in full), ``max_in_flight`` (most chat requests
handled at once).

The reply function gets the request body and returns either a ``str`` — the model's
output verbatim, free text whether or not ``format`` was asked for (a model or server
that ignores ``format``) — or a ``dict`` — the model's verdict, e.g. ``{"score": 85,
"reason": "…"}``: sent as JSON when the request has ``format`` (checked against the
schema, as Ollama's constrained decoding guarantees), else as the free text
``Score: 85`` (plus `` — reason``). The default, :meth:`OllamaStub.hashed_reply`,
behaves like a deterministic model: its score is a hash of what shapes a real model's reply (the
model's digest, the messages, the temperature, the context size, and the seed when the
temperature is above 0), so the same request always gets the same score and a changed
setting or a re-pulled model gets another. Its numbers mean nothing.

Run on its own (e.g. to try ``gptflow run --set judge.hosts=http://127.0.0.1:11435``)::

    python -m benchmarks.ollama_stub --port 11435 --model llama3 --model mistral
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.ollama_wire import Handler, LoggedRequest, Server, check_schema, norm_model


def fixed_reply(score: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A reply function that always gives ``score``."""
    return lambda request: {"score": score}


class OllamaStub:
    """A threaded Ollama look-alike on ``127.0.0.1`` with a random port.

    Use as a context manager; :attr:`host` is the URL to give the client.
    """

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        pullable: list[str] | None = None,
        reply: Callable[[dict[str, Any]], str | dict[str, Any]] | None = None,
        latency_s: float = 0.0,
        fail_first: int = 0,
        hang: bool = False,
        hang_s: float = 30.0,
        die_after: int | None = None,
        max_threads: int = 32,
        port: int = 0,
        bind: str = "127.0.0.1",
    ) -> None:
        self.models = [norm_model(m) for m in (["llama3"] if models is None else models)]
        self._digests: dict[str, str] = {}
        self.pullable = list(pullable or [])
        self.reply = reply or self.hashed_reply
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.hang = hang
        self.hang_s = hang_s
        self.die_after = die_after
        self.requests: list[LoggedRequest] = []
        self.chat_count = 0
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.killed = threading.Event()
        self._conns: set[Any] = set()
        self.pulled: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_threads)
        self._server = Server((bind, port), Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle
    @property
    def host(self) -> str:
        """``http://ADDRESS:PORT``."""
        address, port = self._server.server_address[:2]
        return f"http://{address}:{port}"

    def start(self) -> OllamaStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if not self.killed.is_set():
            self._server.shutdown()
            self._server.server_close()
        self._thread.join(timeout=5)

    def kill(self) -> None:
        """Die like a crashed server: stop listening (new connections are refused) and
        drop every open connection, in-flight requests included, without a reply."""
        if self.killed.is_set():
            return
        self.killed.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> OllamaStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state
    def has_model(self, name: str) -> bool:
        return norm_model(name) in self.models

    def digest(self, name: str) -> str:
        """The digest ``/api/tags`` reports for model ``name`` (64 hex characters)."""
        name = norm_model(name)
        return self._digests.get(name) or hashlib.sha256(name.encode()).hexdigest()

    def repull(self, name: str, digest: str | None = None) -> str:
        """Give model ``name`` a new digest (or ``digest``), as pulling a changed model
        under the same tag does; returns it."""
        with self._lock:
            new = digest or hashlib.sha256(f"{self.digest(name)}+".encode()).hexdigest()
            self._digests[norm_model(name)] = new
        return new

    def hashed_reply(self, request: dict[str, Any]) -> dict[str, Any]:
        """The default reply: a score (0..100) hashed from what shapes a deterministic
        model's reply — the model's digest, the messages, the temperature and context
        size, and the seed only when the temperature is above 0 (greedy decoding ignores
        it)."""
        options = request.get("options") or {}
        temperature = options.get("temperature") or 0
        shaping = {
            "digest": self.digest(request.get("model") or ""),
            "messages": request.get("messages"),
            "temperature": temperature,
            "num_ctx": options.get("num_ctx"),
            "seed": options.get("seed") if temperature > 0 else None,
        }
        text = json.dumps(shaping, sort_keys=True, default=str)
        score = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 101
        return {"score": score, "reason": "stand-in score (a hash of the request)"}

    def _content(self, body: dict[str, Any]) -> str:
        """The reply's ``message.content`` for a chat request (see the module docstring)."""
        verdict = self.reply(body)
        if isinstance(verdict, str):
            return verdict
        fmt = body.get("format")
        if fmt:
            check_schema(verdict, fmt)
            return json.dumps(verdict)
        reason = verdict.get("reason")
        return f"Score: {verdict['score']}" + (f" — {reason}" if reason else "")

    def chat_requests(self) -> list[dict[str, Any]]:
        """Bodies of the ``/api/chat`` requests received so far."""
        with self._lock:
            return [r.body or {} for r in self.requests if r.path == "/api/chat"]

    def _log(self, req: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2024-05-01T12:00:00.000000000Z",
            "size": 4_661_224_676,
            "digest": self.digest(name),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "8.0B",
                "quantization_level": "Q4_0",
            },
        }

    def _show_entry(self, name: str) -> dict[str, Any]:
        entry = self._model_entry(norm_model(name))
        return {
            "modelfile": f"FROM {name}\n",
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
            "capabilities": ["completion"],
            "modified_at": entry["modified_at"],
        }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.ollama_stub``: serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ollama_stub",
        description="A loopback stand-in for an Ollama server, for trying gptflow's judge "
        "without Ollama (its scores mean nothing).",
    )
    parser.add_argument("--port", type=int, default=11435, help="port (default: 11435)")
    parser.add_argument("--bind", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="a model it holds; repeat for several (default: llama3)",
    )
    parser.add_argument(
        "--score",
        type=int,
        default=None,
        help="always reply this score (default: a hash of each request)",
    )
    parser.add_argument(
        "--latency-s", type=float, default=0.0, help="seconds per chat request (default: 0)"
    )
    args = parser.parse_args(argv)
    reply = None if args.score is None else fixed_reply(args.score)
    stub = OllamaStub(
        models=args.model, reply=reply, latency_s=args.latency_s, port=args.port, bind=args.bind
    )
    signal.signal(signal.SIGTERM, lambda *_: stub._stop.set())  # `kill PID` stops it too
    with stub:
        print(
            f"Ollama stand-in on {stub.host} with {', '.join(stub.models)} (Ctrl-C stops it)",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stub._stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
