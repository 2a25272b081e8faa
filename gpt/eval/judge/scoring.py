"""Scoring: every example × judge model × repeat, spread over the Ollama hosts.

:func:`score_examples` sends each request with bounded concurrency per host, a
per-request timeout and retries; a dead host's requests move to the others
(:class:`~gpt.eval.judge.hosts.HostPool`). Every item yields one :class:`Judgment`,
failures included; its score is read by :func:`~gpt.eval.judge.reply.parse_reply`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpt.errors import JudgeError
from gpt.eval.judge.hosts import HostPool, NoLiveHostError, is_connection_error
from gpt.eval.judge.prompt import PROMPT_VERSION, REPLY_SCHEMA, build_prompt
from gpt.eval.judge.reply import ParsedScore, parse_reply
from gpt.eval.judge.settings import JudgeConfig

log = logging.getLogger(__name__)

__all__ = ["Judgment", "score_examples", "score_examples_async"]


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
    ``routes`` (host → models, e.g. from :func:`~gpt.eval.judge.hosts.route`) limits
    which host serves which model (default: every host, every model). Returns one :class:`Judgment` per item in
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
