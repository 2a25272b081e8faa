"""Score model responses with local LLM judges (Llama 3 and others) served by Ollama.

Pure library: talks to Ollama through the official ``ollama`` client, knows nothing
about the catalog or Prefect. The catalog glue lives in ``tasks/judging.py``.

- :class:`JudgeConfig` — hosts, models, repeats, sampling options, concurrency, retries.
- :func:`build_prompt` — the versioned scoring prompt (:data:`PROMPT_VERSION`).
- :func:`parse_score` / :func:`~gpt.eval.judge_reply.parse_reply` — the score in a reply
  (structured JSON first, free-text rules that give ``None`` rather than a wrong number).
- :func:`preflight` — which hosts answer and hold which judge models (opt-in auto-pull).
- :func:`score_examples` — every example × model × repeat, spread over the hosts with
  bounded concurrency per host, per-request timeout and retries, a dead host's requests
  moved to the others; every item yields one :class:`Judgment`, failures included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import Field, field_validator

from gpt.config import Args, operational
from gpt.errors import JudgeError
from gpt.eval.judge_hosts import (
    HostPool,
    HostStatus,
    NoLiveHostError,
    check_host,
    is_connection_error,
    not_pulled_error,
    pull_model,
    unreachable_error,
)
from gpt.eval.judge_reply import REPLY_SCHEMA, ParsedScore, parse_reply, parse_score
from gpt.prompts import format_alpaca

log = logging.getLogger(__name__)

__all__ = [
    "PROMPT_TEMPLATE",
    "PROMPT_VERSION",
    "REPLY_SCHEMA",
    "HostStatus",
    "JudgeConfig",
    "Judgment",
    "ParsedScore",
    "build_prompt",
    "judge_fix",
    "parse_reply",
    "parse_score",
    "preflight",
    "pull_model",
    "score_examples",
    "score_examples_async",
]

#: Version of :data:`PROMPT_TEMPLATE`; stored with every score. Bump it whenever the
#: template text (or how the reply is requested) changes so scores from different
#: prompts are never mixed. v2: the reply is asked for as JSON (:data:`REPLY_SCHEMA`).
PROMPT_VERSION = "v2"

#: The scoring prompt. ``{prompt}`` is the Alpaca-formatted instruction (+ input),
#: ``{output}`` the reference answer, ``{response}`` the model's answer.
PROMPT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, "
    "where 100 is the best score. "
    'Answer with a JSON object: {{"score": <integer from 0 to 100>, '
    '"reason": "<one short sentence>"}}.'
)


def _default_hosts() -> tuple[str, ...]:
    return (os.environ.get("OLLAMA_HOST") or "http://localhost:11434",)


def _as_tuple(value: Any) -> Any:
    """A single name is a one-element list (``--set judge.models=phi3``)."""
    return (value,) if isinstance(value, str) else value


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
    """Ask for a JSON reply matching :data:`REPLY_SCHEMA` (Ollama's ``format``, Ollama
    0.5 or later). Off, or with a server that ignores it, free-text replies are read by
    the fallback rules of :mod:`gpt.eval.judge_reply`."""
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
    """Pull a missing model (on each reachable host lacking it) during :func:`preflight`
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

    def options(self, repeat: int = 0) -> dict[str, Any]:
        """The Ollama ``options`` sent with every chat request of repeat ``repeat``."""
        return {
            "seed": self.seed + repeat,
            "temperature": self.temperature,
            "num_ctx": self.num_ctx,
        }


def judge_fix(cfg: JudgeConfig) -> str:
    """The commands that make the judges available (start the server, pull the models)."""
    pulls = " and ".join(f"`ollama pull {m}`" for m in cfg.models)
    return f"start Ollama with `ollama serve`, pull the judge with {pulls}"


@dataclass
class Judgment:
    """The judge's verdict on one example (one row of the ``judgments`` table)."""

    example_id: int
    """Id of the response within its run."""
    judge_model: str
    """Ollama model that judged."""
    prompt_version: str
    """:data:`PROMPT_VERSION` of the template used."""
    score: int | None
    """0..100, or ``None`` when the reply held no valid score or the request failed."""
    raw_reply: str | None
    """The judge's reply verbatim (``None`` when no reply came back)."""
    latency_s: float
    """Wall time of the request, retries included."""
    judged_at: datetime
    """When the verdict was recorded (UTC, naive)."""
    error: str | None = None
    """Why no reply came back after all retries; ``None`` when the judge answered."""
    repeat: int = 0
    """Which of the ``repeats`` scorings of this example by this model (0-based)."""
    parse_rule: str | None = None
    """How the score was read (``json``, ``number``, ``label``, ``lone``); ``None``
    without a score."""
    host: str | None = None
    """The server that answered (or last failed)."""

    def as_row(self) -> dict[str, Any]:
        """A dict with the ``judgments`` column names (run_id added by the caller)."""
        return {
            "example_id": self.example_id,
            "judge_model": self.judge_model,
            "prompt_version": self.prompt_version,
            "repeat": self.repeat,
            "score": self.score,
            "raw_reply": self.raw_reply,
            "parse_rule": self.parse_rule,
            "latency_s": self.latency_s,
            "judged_at": self.judged_at,
            "error": self.error,
            "host": self.host,
        }


# --------------------------------------------------------------------------- prompt


def build_prompt(instruction: str, input_text: str, output: str, response: str) -> str:
    """The :data:`PROMPT_VERSION` scoring prompt for one example."""
    return PROMPT_TEMPLATE.format(
        prompt=format_alpaca(instruction, input_text or ""),
        output=output,
        response=response,
    )


# --------------------------------------------------------------------------- preflight


def preflight(cfg: JudgeConfig, *, progress: bool = True) -> list[HostStatus]:
    """Check which of ``cfg.hosts`` answer and which of ``cfg.models`` each holds, before
    any scoring.

    Passes when at least one host is up and every model is on some live host; hosts
    that are down or lack a model are logged and left out of the routing (pass
    ``{s.url: s.models for s in statuses if s.up}`` as ``routes`` to
    :func:`score_examples`). Raises :class:`~gpt.errors.OllamaUnreachableError` (no
    host answers) or :class:`~gpt.errors.ModelNotPulledError` with the command that
    fixes it; with ``cfg.auto_pull`` a missing model is pulled on every reachable host
    lacking it (progress bar) first.
    """
    statuses = [
        check_host(
            url,
            cfg.models,
            timeout_s=cfg.timeout_s,
            auto_pull=cfg.auto_pull,
            progress=progress,
        )
        for url in cfg.hosts
    ]
    up = [s for s in statuses if s.up]
    if not up:
        raise unreachable_error(statuses)
    for model in cfg.models:
        if not any(model in s.models for s in up):
            raise not_pulled_error(model, [s.url for s in up])
    for s in statuses:
        if not s.up:
            log.warning("judge host %s is down, using the others: %s", s.url, s.error)
        elif s.missing:
            log.warning("judge host %s lacks %s; the other hosts judge with it", s.url, s.missing)
    return statuses


# --------------------------------------------------------------------------- scoring


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _is_retryable(exc: BaseException) -> bool:
    """Connection problems, timeouts and 5xx are transient; 4xx and the rest are not."""
    import httpx
    import ollama

    if isinstance(exc, ollama.ResponseError):
        return exc.status_code >= 500 or exc.status_code == -1
    return isinstance(exc, ConnectionError | TimeoutError | httpx.TransportError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Item:
    """One request: an example scored by one model, one repeat."""

    example_id: int
    model: str
    repeat: int
    prompt: str


async def _chat_once(client: Any, cfg: JudgeConfig, item: _Item) -> str:
    kwargs: dict[str, Any] = {
        "model": item.model,
        "messages": [{"role": "user", "content": item.prompt}],
        "options": cfg.options(item.repeat),
    }
    if cfg.structured:
        kwargs["format"] = REPLY_SCHEMA
    if not cfg.stream:
        reply = await client.chat(**kwargs, stream=False)
        return reply.message.content or ""
    parts: list[str] = []
    async for chunk in await client.chat(**kwargs, stream=True):
        parts.append(chunk.message.content or "")
    return "".join(parts)


async def _judge_item(pool: HostPool, cfg: JudgeConfig, item: _Item) -> Judgment:
    """Send one item until it has a reply or its attempts are spent.

    Timeouts and 5xx are retried on the same host after a backoff (the slot is kept, so
    a struggling host gets no extra load). A connection error moves the item to another
    live host without using up an attempt (at most ``dead_after`` moves per host); with
    no other host it is retried like the rest.
    """
    import ollama

    attempt = 0
    moves = 0
    max_moves = len(pool.hosts) * cfg.dead_after
    error: str | None = None
    reply: str | None = None
    host_url: str | None = None
    start: float | None = None
    finished = False
    while not finished:
        try:
            host = await pool.acquire(item.model)
        except NoLiveHostError as exc:
            error = f"{error}; {exc}" if error else str(exc)
            break
        host_url = host.url
        start = time.perf_counter() if start is None else start
        try:
            while True:
                try:
                    reply = await asyncio.wait_for(
                        _chat_once(host.client, cfg, item), cfg.timeout_s
                    )
                    pool.answered(host)
                    error, finished = None, True
                    break
                except Exception as exc:
                    connection = is_connection_error(exc)
                    if connection:
                        await pool.connection_failed(host, _describe(exc))
                    elif isinstance(exc, ollama.ResponseError):
                        pool.answered(host, content=False)  # an HTTP error is still a reply
                    if connection and moves < max_moves and pool.live_for(item.model, besides=host):
                        moves += 1
                        error = f"{_describe(exc)} ({host.url})"
                        break  # placed again, on the least busy live host
                    attempt += 1
                    error = f"{_describe(exc)} (attempt {attempt}/{cfg.retries + 1}, {host.url})"
                    if not _is_retryable(exc) or attempt > cfg.retries:
                        finished = True
                        break
                    delay = cfg.backoff_s * (2 ** (attempt - 1))
                    log.debug("example %s: %s; retrying in %.2fs", item.example_id, error, delay)
                    await asyncio.sleep(delay)
                    if host.dead is not None:
                        break  # placed again (or NoLiveHostError)
        finally:
            await pool.release(host)
    latency = time.perf_counter() - start if start is not None else 0.0
    if error is not None:
        log.warning("example %s (%s) not judged: %s", item.example_id, item.model, error)
    parsed = parse_reply(reply) if error is None else ParsedScore(None, None)
    return Judgment(
        example_id=item.example_id,
        judge_model=item.model,
        prompt_version=PROMPT_VERSION,
        score=parsed.score,
        raw_reply=reply if error is None else None,
        latency_s=latency,
        judged_at=_utcnow(),
        error=error,
        repeat=item.repeat,
        parse_rule=parsed.rule,
        host=host_url,
    )


_REQUIRED_KEYS = ("example_id", "instruction", "output", "response")


def _items(
    examples: Sequence[dict[str, Any]],
    cfg: JudgeConfig,
    pending: Collection[tuple[int, str, int]] | None,
) -> list[_Item]:
    items = []
    for i, ex in enumerate(examples):
        missing = [k for k in _REQUIRED_KEYS if k not in ex]
        if missing:
            raise JudgeError(f"example #{i} lacks field(s) {missing}; need {_REQUIRED_KEYS}")
        prompt = build_prompt(
            str(ex["instruction"]),
            str(ex.get("input") or ""),
            str(ex["output"]),
            str(ex["response"] or ""),
        )
        eid = int(ex["example_id"])
        for model in cfg.models:
            for repeat in range(cfg.repeats):
                if pending is None or (eid, model, repeat) in pending:
                    items.append(_Item(eid, model, repeat, prompt))
    return items


async def score_examples_async(
    examples: Sequence[dict[str, Any]],
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    on_result: Callable[[Judgment], None] | None = None,
    pending: Collection[tuple[int, str, int]] | None = None,
    routes: dict[str, Collection[str]] | None = None,
    hosts_down: list[str] | None = None,
) -> list[Judgment]:
    """Score each example by each of ``cfg.models``, ``cfg.repeats`` times, spread over
    ``cfg.hosts`` with at most ``cfg.concurrency`` requests in flight per host.

    Each example is a dict with ``example_id``, ``instruction``, ``input``, ``output`` and
    ``response``. ``pending`` limits the work to those ``(example_id, model, repeat)``;
    ``routes`` (host → models, e.g. from :func:`preflight`) limits which host serves which
    model (default: every host, every model). Returns one :class:`Judgment` per item in
    example, model, repeat order; requests that still fail after the retries give
    ``score=None`` with ``error`` set. ``hosts_down``, if given, receives ``url: why`` for
    each host taken out of rotation.
    """
    import ollama
    from tqdm.auto import tqdm

    items = _items(examples, cfg, pending)
    if not items:
        return []
    clients = {url: ollama.AsyncClient(host=url, timeout=cfg.timeout_s) for url in cfg.hosts}
    pool = HostPool.of(clients, routes=routes, per_host=cfg.concurrency, dead_after=cfg.dead_after)
    desc = f"judge {','.join(cfg.models)}"
    bar = tqdm(total=len(items), desc=desc, unit="req", disable=not progress)

    async def run(item: _Item) -> Judgment:
        judgment = await _judge_item(pool, cfg, item)
        bar.update(1)
        if on_result is not None:
            on_result(judgment)
        return judgment

    tasks = [asyncio.create_task(run(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # an error in on_result (or a cancel) stops the rest
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        if hosts_down is not None:
            hosts_down.extend(pool.down())
        for client in clients.values():
            await client.close()


def score_examples(
    examples: Sequence[dict[str, Any]],
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    on_result: Callable[[Judgment], None] | None = None,
    pending: Collection[tuple[int, str, int]] | None = None,
    routes: dict[str, Collection[str]] | None = None,
    hosts_down: list[str] | None = None,
) -> list[Judgment]:
    """Synchronous :func:`score_examples_async` (``on_result`` is called with each
    judgment as it completes, e.g. to save progress).

    Uses ``asyncio.run``; when called from inside a running event loop (a notebook, an
    async Prefect task) it runs the coroutine on a fresh loop in a worker thread.
    """

    def coro_factory() -> Any:
        return score_examples_async(
            examples,
            cfg,
            progress=progress,
            on_result=on_result,
            pending=pending,
            routes=routes,
            hosts_down=hosts_down,
        )

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result()
