"""The judge's settings and the judge key.

:class:`JudgeConfig` is the pipeline's ``judge`` section. Its non-operational fields, the
digests of the prompt and reply schema, and the reader's version shape a judgment; with
the model and the digest the server reports for it they make the **judge key**
(:meth:`JudgeConfig.judge_key`), which every stored judgment carries. Judgments are
reused only under the same key, so scores never outlive the settings that made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gpt.config import Args, operational
from gpt.eval.judge.prompt import PROMPT_VERSION, prompt_digest, schema_digest
from gpt.eval.judge.reply import READER_VERSION

__all__ = ["JudgeConfig", "JudgeKey", "host_url_problem", "judge_fix"]


def _default_hosts() -> tuple[str, ...]:
    return (os.environ.get("OLLAMA_HOST") or "http://localhost:11434",)


def _as_tuple(value: Any) -> Any:
    """A single name is a one-element list (``--set judge.models=phi3``)."""
    return (value,) if isinstance(value, str) else value


#: A DNS name or an IPv4 address (an IPv6 address goes in brackets).
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def host_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as an Ollama server address, or None. The forms the
    ``ollama`` client takes: ``[http[s]://]host[:port][/path]``."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        if "//" in url or re.match(r"https?:", url):
            return "a mangled scheme (write http://host:port)"
        scheme, url = "http", f"http://{url}"
    if scheme not in ("http", "https"):
        return f"scheme {scheme!r} (use http:// or https://)"
    if any(c.isspace() for c in url) or "," in url:
        return "one URL per entry, without spaces or commas (give a list for several)"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises on a port that is no number in 0-65535)
    except ValueError:
        return f"port {parts.netloc.rpartition(':')[2]!r} is not a number up to 65535"
    host = parts.hostname or ""
    if parts.query or parts.fragment or "@" in parts.netloc:
        return "no query, fragment or user part"
    if not (_HOST_NAME.fullmatch(host) or (parts.netloc.startswith("[") and host)):
        return f"host {host!r} is not a host name or address"
    return None


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class JudgeKey:
    """What one judge model's judgments depend on, and its hash.

    ``settings`` holds every part by name (stored with each judgment as
    ``judge_settings``); ``reply_key`` hashes the parts that shape one reply (all but the
    reader's version and ``repeats``), so a reply stored under another reader or another
    number of repeats is reused — read again by this reader — instead of asked for again.
    """

    model: str
    """The judge model as configured."""
    key: str
    """Hash of ``settings`` (24 hex characters): the ``judge_key`` column."""
    reply_key: str
    """Hash of ``settings`` without ``reader_version`` and ``repeats``."""
    settings: dict[str, Any]
    """model, model_digest, every non-operational setting but ``models``, the prompt's
    and schema's digests, the prompt version, the reader's version."""


class JudgeConfig(Args):
    """How to reach and use the Ollama judges (the pipeline's ``judge`` section)."""

    renamed: ClassVar[dict[str, str]] = {"host": "hosts", "model": "models"}

    required: bool = operational(False)
    """Whether the pipeline must fail when the judge is unavailable. The library always
    raises :class:`~gpt.errors.JudgeError`; the judge stage with ``required`` false
    records the stage as skipped with the fix (the responses are stored and can be
    judged later)."""
    hosts: tuple[str, ...] = operational(default_factory=_default_hosts, min_length=1)
    """Ollama server URLs; requests are spread over them (default: ``OLLAMA_HOST`` if
    set, else ``http://localhost:11434``). A host that keeps refusing connections is
    taken out of rotation and its requests go to the others."""
    models: tuple[str, ...] = Field(("llama3",), min_length=1)
    """Judge models as Ollama knows them (``llama3`` is ``llama3:latest``); each scores
    every example, and the catalog compares them (``judge_agreement``)."""
    repeats: int = Field(1, ge=1, le=100)
    """How many times each model scores each example (repeat ``r`` uses seed
    ``seed + r``); with temperature 0 the repeats agree, so raise the temperature to
    measure the judge's own spread (``judge_spread``)."""
    seed: int = 123
    """Sampling seed of repeat 0, passed in the request options."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0 = greedy, reproducible scores)."""
    num_ctx: int = Field(2048, ge=1)
    """Context window the server allocates for each request."""
    structured: bool = True
    """Ask for a JSON reply matching :data:`~gpt.eval.judge.prompt.REPLY_SCHEMA`
    (Ollama's ``format``, Ollama 0.5 or later). Off, or with a server that ignores it,
    free-text replies are read by the rules of :mod:`gpt.eval.judge.reply`."""
    concurrency: int = operational(4, ge=1, le=64)
    """Maximum number of requests in flight on each host."""
    timeout_s: float = operational(120.0, gt=0)
    """Per-request timeout in seconds (one attempt)."""
    retries: int = operational(3, ge=0)
    """Extra attempts after the first on connection errors, timeouts and 5xx replies
    (moving to another live host after a connection error does not use one up)."""
    backoff_s: float = operational(1.0, ge=0)
    """Delay before the first retry; doubles on each further retry."""
    dead_after: int = operational(3, ge=1)
    """Connection errors in a row after which a host is taken out of rotation for the
    rest of the call."""
    auto_pull: bool = operational(False)
    """Pull a missing model (on each reachable host lacking it) during the preflight
    instead of failing."""
    stream: bool = operational(False)
    """Ask for a streamed reply (NDJSON chunks) instead of one JSON body."""

    @field_validator("hosts", "models", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_tuple(value)

    @field_validator("hosts", "models")
    @classmethod
    def _distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not v.strip() for v in value):
            raise ValueError("names must be non-empty")
        if len(set(value)) != len(value):
            raise ValueError(f"names must be distinct, got {list(value)}")
        return value

    @field_validator("hosts")
    @classmethod
    def _host_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            problem = host_url_problem(url)
            if problem:
                raise ValueError(
                    f"{url!r} is not an Ollama URL: {problem}; e.g. http://localhost:11434"
                )
        return value

    def options(self, repeat: int = 0) -> dict[str, Any]:
        """The Ollama ``options`` sent with every chat request of repeat ``repeat``."""
        return {
            "seed": self.seed + repeat,
            "temperature": self.temperature,
            "num_ctx": self.num_ctx,
        }

    def key_dict(self) -> dict[str, Any]:
        """The settings that shape the judgments (for the judge stage's cache key): the
        fields, plus the digests of the text sent and the reader's version."""
        return {
            **super().key_dict(),
            "prompt_version": PROMPT_VERSION,
            "prompt_sha256": prompt_digest(),
            "schema_sha256": schema_digest(),
            "reader_version": READER_VERSION,
        }

    def judge_key(self, model: str, model_digest: str) -> JudgeKey:
        """The key of ``model``'s judgments under these settings, with the digest the
        server reports for the model (a re-pulled model is another key)."""
        shared = {k: v for k, v in self.key_dict().items() if k != "models"}
        settings = {"model": model, "model_digest": model_digest, **shared}
        reply = {k: v for k, v in settings.items() if k not in ("reader_version", "repeats")}
        return JudgeKey(
            model=model, key=_digest(settings), reply_key=_digest(reply), settings=settings
        )


def judge_fix(cfg: JudgeConfig) -> str:
    """The commands that make the judges available (start the server, pull the models)."""
    pulls = " and ".join(f"`ollama pull {m}`" for m in cfg.models)
    return f"start Ollama with `ollama serve`, pull the judge with {pulls}"
