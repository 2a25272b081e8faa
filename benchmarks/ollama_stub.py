"""A loopback HTTP server speaking the slice of the Ollama REST API gptflow uses.

It answers the real ``ollama`` Python client exactly as an Ollama server would:

- ``GET /``            → ``Ollama is running``
- ``GET /api/tags``    → ``{"models": [{"name", "model", "modified_at", "size", "digest", "details"}]}``
- ``POST /api/show``   → model details, or 404 ``{"error": "model 'X' not found"}``
- ``POST /api/chat``   → one JSON body (``"stream": false``) or NDJSON chunks ending with a
  ``"done": true`` line; a missing model gives 404
  ``{"error": "model \"X\" not found, try pulling it first"}``
- ``POST /api/pull``   → NDJSON status lines (manifest, per-layer progress, ``success``),
  after which the model is listed; an unknown model streams
  ``{"error": "pull model manifest: file does not exist"}``

Knobs: the models present, the models pullable, a reply function (request → text),
a fixed latency per chat request, failing the first N chat requests with 500, hanging.
Every request is logged in :attr:`OllamaStub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _norm(name: str) -> str:
    """``llama3`` → ``llama3:latest`` (Ollama's default tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


@dataclass
class LoggedRequest:
    """One request the stub received."""

    method: str
    path: str
    body: dict[str, Any] | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing
    def _read_json(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        return json.loads(self.rfile.read(length))

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_ndjson(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routes
    def do_GET(self) -> None:
        stub = self.server.stub
        stub._log(LoggedRequest("GET", self.path, None))
        if self.path == "/":
            self._send_text(200, "Ollama is running")
        elif self.path == "/api/tags":
            self._send_json(200, {"models": [stub._model_entry(m) for m in stub.models]})
        else:
            self._send_text(404, "404 page not found")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        stub = self.server.stub
        try:
            body = self._read_json()
        except json.JSONDecodeError:
            stub._log(LoggedRequest("POST", self.path, None))
            self._send_json(400, {"error": "invalid character in request body"})
            return
        stub._log(LoggedRequest("POST", self.path, body))
        body = body or {}
        if self.path == "/api/chat":
            self._chat(body)
        elif self.path == "/api/show":
            name = body.get("model") or body.get("name") or ""
            if not stub.has_model(name):
                self._send_json(404, {"error": f"model '{name}' not found"})
                return
            self._send_json(200, stub._show_entry(name))
        elif self.path == "/api/pull":
            self._pull(body)
        else:
            self._send_text(404, "404 page not found")

    def _chat(self, body: dict[str, Any]) -> None:
        stub = self.server.stub
        name = body.get("model") or ""
        if not name:
            self._send_json(400, {"error": "model is required"})
            return
        with stub._lock:
            stub.chat_count += 1
            nth = stub.chat_count
        if nth <= stub.fail_first:
            self._send_json(500, {"error": "llama runner process has terminated: exit status 2"})
            return
        if not stub.has_model(name):
            self._send_json(404, {"error": f'model "{name}" not found, try pulling it first'})
            return
        if stub.hang:
            stub._stop.wait(stub.hang_s)
            self.close_connection = True
            return  # close without a reply
        if stub.latency_s:
            time.sleep(stub.latency_s)
        text = stub.reply(body)
        base = {"model": _norm(name), "created_at": _now()}
        stats = {
            "done_reason": "stop",
            "total_duration": int(stub.latency_s * 1e9),
            "load_duration": 1000,
            "prompt_eval_count": 10,
            "prompt_eval_duration": 1000,
            "eval_count": max(1, len(text.split())),
            "eval_duration": 1000,
        }
        if body.get("stream", True):  # Ollama streams unless told not to
            self._start_ndjson()
            pieces = [text[i : i + 3] for i in range(0, len(text), 3)] or [""]
            for piece in pieces:
                self._chunk(
                    {**base, "message": {"role": "assistant", "content": piece}, "done": False}
                )
            self._chunk(
                {**base, "message": {"role": "assistant", "content": ""}, "done": True, **stats}
            )
            self._end_chunks()
        else:
            self._send_json(
                200,
                {**base, "message": {"role": "assistant", "content": text}, "done": True, **stats},
            )

    def _pull(self, body: dict[str, Any]) -> None:
        stub = self.server.stub
        name = body.get("model") or body.get("name") or ""
        stream = body.get("stream", True)
        if _norm(name) not in {_norm(m) for m in stub.pullable}:
            err = {"error": "pull model manifest: file does not exist"}
            if stream:
                self._start_ndjson()
                self._chunk({"status": "pulling manifest"})
                self._chunk(err)
                self._end_chunks()
            else:
                self._send_json(500, err)
            return
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = 4_000
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        for done in range(0, total + 1, 1_000):
            lines.append(
                {
                    "status": f"pulling {digest[7:19]}",
                    "digest": digest,
                    "total": total,
                    "completed": done,
                }
            )
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        with stub._lock:
            stub.pulled.append(name)
            if not stub.has_model(name):
                stub.models.append(_norm(name))
        if stream:
            self._start_ndjson()
            for line in lines:
                self._chunk(line)
            self._end_chunks()
        else:
            self._send_json(200, {"status": "success"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    stub: OllamaStub

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bound the handler threads: block the accept loop while all slots are busy.
        self.stub._slots.acquire()
        try:
            super().process_request(request, client_address)
        except Exception:
            self.stub._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.stub._slots.release()


def default_reply(request: dict[str, Any]) -> str:
    """A fixed, valid score."""
    return "50"


class OllamaStub:
    """A threaded Ollama look-alike on ``127.0.0.1`` with a random port.

    Use as a context manager; :attr:`host` is the URL to give the client.
    """

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        pullable: list[str] | None = None,
        reply: Callable[[dict[str, Any]], str] = default_reply,
        latency_s: float = 0.0,
        fail_first: int = 0,
        hang: bool = False,
        hang_s: float = 30.0,
        max_threads: int = 32,
    ) -> None:
        self.models = [_norm(m) for m in (["llama3"] if models is None else models)]
        self.pullable = list(pullable or [])
        self.reply = reply
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.hang = hang
        self.hang_s = hang_s
        self.requests: list[LoggedRequest] = []
        self.chat_count = 0
        self.pulled: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_threads)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle
    @property
    def host(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OllamaStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OllamaStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state
    def has_model(self, name: str) -> bool:
        return _norm(name) in self.models

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
            "digest": hashlib.sha256(name.encode()).hexdigest(),
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
        entry = self._model_entry(_norm(name))
        return {
            "modelfile": f"FROM {name}\n",
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
            "capabilities": ["completion"],
            "modified_at": entry["modified_at"],
        }
