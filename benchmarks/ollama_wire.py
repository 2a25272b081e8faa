"""The HTTP side of :mod:`benchmarks.ollama_stub`: what each Ollama endpoint answers
(``/``, ``/api/tags``, ``/api/show``, ``/api/chat`` whole or streamed, ``/api/pull``) and
the server that bounds its handler threads and closes every connection when the stub is
killed. The state it answers from (models, reply function, faults, counters) is the
:class:`~benchmarks.ollama_stub.OllamaStub` the server carries.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.ollama_stub import OllamaStub


def norm_model(name: str) -> str:
    """``llama3`` → ``llama3:latest`` (Ollama's default tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


@dataclass
class LoggedRequest:
    """One request the stub received."""

    method: str
    path: str
    body: dict[str, Any] | None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

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
        if stub.die_after is not None and nth > stub.die_after:
            threading.Thread(target=stub.kill, daemon=True).start()
            self.close_connection = True
            return  # dies with this request in flight: no reply
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
        with stub._lock:
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            if stub.latency_s:
                time.sleep(stub.latency_s)
            text = stub._content(body)
        except ValueError as exc:
            self._send_json(500, {"error": f"ollama stub: {exc}"})
            return
        finally:
            with stub._lock:
                stub.in_flight -= 1
        if stub.killed.is_set():
            self.close_connection = True
            return
        self._send_reply(name, body, text)
        with stub._lock:
            stub.answered += 1  # only replies written in full

    def _send_reply(self, name: str, body: dict[str, Any], text: str) -> None:
        stub = self.server.stub
        base = {"model": norm_model(name), "created_at": now_stamp()}
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
        if norm_model(name) not in {norm_model(m) for m in stub.pullable}:
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
                stub.models.append(norm_model(name))
        if stream:
            self._start_ndjson()
            for line in lines:
                self._chunk(line)
            self._end_chunks()
        else:
            self._send_json(200, {"status": "success"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    stub: OllamaStub

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bound the handler threads: block the accept loop while all slots are busy.
        self.stub._slots.acquire()
        with self.stub._lock:
            self.stub._conns.add(request)
        try:
            super().process_request(request, client_address)
        except Exception:
            self.stub._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.stub._lock:
                self.stub._conns.discard(request)
            self.stub._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self.stub.killed.is_set():  # a killed server's broken pipes are expected
            super().handle_error(request, client_address)


def check_schema(verdict: dict[str, Any], schema: Any) -> None:
    """Raise ValueError when ``verdict`` does not match the request's JSON schema."""
    if not isinstance(schema, dict):
        return  # "json": any JSON object
    import jsonschema

    try:
        jsonschema.validate(verdict, schema)
    except jsonschema.ValidationError as exc:
        raise ValueError(
            f"reply {verdict} does not match the format schema: {exc.message}"
        ) from None
