"""Score model responses with a local LLM judge (Llama 3) served by Ollama.

Pure library: talks to Ollama through the official ``ollama`` client, knows nothing
about the catalog or Prefect. The catalog glue lives in ``tasks/judging.py``.

- :class:`JudgeConfig` — host, model, sampling options, concurrency, retry policy.
- :func:`build_prompt` — the versioned scoring prompt (:data:`PROMPT_VERSION`).
- :func:`parse_score` — the first integer of a reply if it lies in 0..100, else ``None``.
- :func:`preflight` — server reachable and model present (opt-in auto-pull).
- :func:`score_examples` — bounded-concurrency async scoring with per-request timeout and
  retries; every example yields one :class:`Judgment`, failures included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from gpt.config import Args, operational
from gpt.errors import JudgeError, ModelNotPulledError, OllamaUnreachableError

log = logging.getLogger(__name__)

#: Version of :data:`PROMPT_TEMPLATE`; stored with every score. Bump it whenever the
#: template text changes so scores from different prompts are never mixed.
PROMPT_VERSION = "v1"

#: The scoring prompt. ``{prompt}`` is the Alpaca-formatted instruction (+ input),
#: ``{output}`` the reference answer, ``{response}`` the model's answer.
PROMPT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, "
    "where 100 is the best score. "
    "Respond with the integer number only."
)

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def _default_host() -> str:
    return os.environ.get("OLLAMA_HOST") or "http://localhost:11434"


class JudgeConfig(Args):
    """How to reach and use the Ollama judge (the pipeline's ``judge`` section)."""

    required: bool = operational(False)
    """Whether the pipeline must fail when the judge is unavailable. The library always
    raises :class:`~gpt.errors.JudgeError`; the judge stage with ``required`` false
    records the stage as skipped with the fix (the responses are stored and can be
    judged later)."""
    host: str = operational(default_factory=_default_host)
    """Ollama server URL (default: ``OLLAMA_HOST`` if set, else ``http://localhost:11434``)."""
    model: str = Field("llama3", min_length=1)
    """Judge model name as Ollama knows it (``llama3`` is ``llama3:latest``)."""
    seed: int = 123
    """Sampling seed passed in the request options."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0 = greedy, reproducible scores)."""
    num_ctx: int = Field(2048, ge=1)
    """Context window the server allocates for each request."""
    concurrency: int = operational(4, ge=1, le=64)
    """Maximum number of requests in flight at once."""
    timeout_s: float = operational(120.0, gt=0)
    """Per-request timeout in seconds (one attempt)."""
    retries: int = operational(3, ge=0)
    """Extra attempts after the first on connection errors, timeouts and 5xx replies."""
    backoff_s: float = operational(1.0, ge=0)
    """Delay before the first retry; doubles on each further retry."""
    auto_pull: bool = operational(False)
    """Pull a missing model during :func:`preflight` instead of failing."""
    stream: bool = operational(False)
    """Ask for a streamed reply (NDJSON chunks) instead of one JSON body."""

    def options(self) -> dict[str, Any]:
        """The Ollama ``options`` sent with every chat request."""
        return {"seed": self.seed, "temperature": self.temperature, "num_ctx": self.num_ctx}


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

    def as_row(self) -> dict[str, Any]:
        """A dict with the ``judgments`` column names (run_id added by the caller)."""
        return {
            "example_id": self.example_id,
            "judge_model": self.judge_model,
            "prompt_version": self.prompt_version,
            "score": self.score,
            "raw_reply": self.raw_reply,
            "latency_s": self.latency_s,
            "judged_at": self.judged_at,
            "error": self.error,
        }


# --------------------------------------------------------------------------- prompt


def _format_alpaca(instruction: str, input_text: str) -> str:
    """The Alpaca prompt (instruction, optional input) — ``gpt.prompts`` if present."""
    try:
        from gpt.prompts import format_alpaca
    except ImportError:
        text = f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        return text + (f"\n\n### Input:\n{input_text}" if input_text else "")
    return format_alpaca(instruction, input_text)


def build_prompt(instruction: str, input_text: str, output: str, response: str) -> str:
    """The :data:`PROMPT_VERSION` scoring prompt for one example."""
    return PROMPT_TEMPLATE.format(
        prompt=_format_alpaca(instruction, input_text or ""),
        output=output,
        response=response,
    )


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str | None) -> int | None:
    """The score in a judge reply.

    Rule: take the *first* number in the reply. It is the score if it is a whole number in
    0..100 (``"85"``, ``"Score: 85/100"``, ``"I'd give it 85."`` → 85); anything else —
    no number, a negative or fractional number, or one above 100 (``"105"``, ``"-3"``,
    ``"85.5"``) — gives ``None``: the reply is kept verbatim and the score stays NULL
    rather than guessing from a later number.
    """
    if not reply:
        return None
    match = _NUMBER.search(reply)
    if match is None:
        return None
    token = match.group(0)
    if "." in token or token.startswith("-"):
        return None
    value = int(token)
    return value if 0 <= value <= 100 else None


# --------------------------------------------------------------------------- preflight


def _names_match(wanted: str, present: str) -> bool:
    """Ollama treats ``llama3`` and ``llama3:latest`` as the same model."""

    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return norm(wanted) == norm(present)


def _unreachable(cfg: JudgeConfig, detail: object) -> OllamaUnreachableError:
    return OllamaUnreachableError(
        f"Ollama is not reachable at {cfg.host} — start it with `ollama serve` "
        f"(or set OLLAMA_HOST / judge.host) [{detail}]"
    )


def _not_pulled(cfg: JudgeConfig) -> ModelNotPulledError:
    return ModelNotPulledError(
        f"model '{cfg.model}' is not pulled — run `ollama pull {cfg.model}` "
        f"(or set judge.auto_pull) [host {cfg.host}]"
    )


def preflight(cfg: JudgeConfig, *, progress: bool = True) -> None:
    """Check that the server answers and the model is present before any scoring.

    Raises :class:`OllamaUnreachableError` or :class:`ModelNotPulledError` with the command
    that fixes it; with ``cfg.auto_pull`` a missing model is pulled first (progress bar).
    """
    import httpx
    import ollama

    client = ollama.Client(host=cfg.host, timeout=min(cfg.timeout_s, 30.0))
    try:
        try:
            listing = client.list()
        except (ConnectionError, httpx.TransportError) as exc:
            raise _unreachable(cfg, exc) from None
        except ollama.ResponseError as exc:
            raise _unreachable(
                cfg, f"GET /api/tags answered {exc}; is this an Ollama server?"
            ) from None
        names = [m.model or "" for m in listing.models]
        if any(_names_match(cfg.model, n) for n in names):
            return
        # Not listed under that name: ask the server (it resolves aliases and tags).
        try:
            client.show(cfg.model)
            return
        except ollama.ResponseError as exc:
            if exc.status_code != 404:
                raise JudgeError(
                    f"Ollama at {cfg.host} failed to show '{cfg.model}': {exc}"
                ) from None
        except (ConnectionError, httpx.TransportError) as exc:
            raise _unreachable(cfg, exc) from None
        if not cfg.auto_pull:
            raise _not_pulled(cfg)
        pull_model(cfg, progress=progress)
    finally:
        client.close()


def pull_model(cfg: JudgeConfig, *, progress: bool = True) -> None:
    """``ollama pull`` the judge model, with a byte progress bar per layer."""
    import httpx
    import ollama
    from tqdm.auto import tqdm

    log.info("pulling %s from %s", cfg.model, cfg.host)
    client = ollama.Client(host=cfg.host, timeout=httpx.Timeout(cfg.timeout_s, read=None))
    bars: dict[str, Any] = {}
    last_status = ""
    try:
        for part in client.pull(cfg.model, stream=True):
            last_status = part.status or last_status
            if part.digest and part.total:
                bar = bars.get(part.digest)
                if bar is None:
                    bar = tqdm(
                        total=part.total,
                        desc=f"pull {part.digest[7:19] if part.digest.startswith('sha256:') else part.digest[:12]}",
                        unit="B",
                        unit_scale=True,
                        disable=not progress,
                        leave=False,
                    )
                    bars[part.digest] = bar
                if part.completed is not None:
                    bar.update(max(0, part.completed - bar.n))
            elif part.status:
                log.info("pull %s: %s", cfg.model, part.status)
    except ollama.ResponseError as exc:
        raise ModelNotPulledError(
            f"pulling model '{cfg.model}' from {cfg.host} failed: {exc.error} — "
            f"check the model name or run `ollama pull {cfg.model}` yourself"
        ) from None
    except (ConnectionError, httpx.TransportError) as exc:
        raise _unreachable(cfg, exc) from None
    finally:
        for bar in bars.values():
            bar.close()
        client.close()
    if last_status != "success":
        raise ModelNotPulledError(
            f"pulling model '{cfg.model}' from {cfg.host} ended with status "
            f"{last_status!r} instead of 'success' — run `ollama pull {cfg.model}`"
        )


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


async def _chat_once(client: Any, cfg: JudgeConfig, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not cfg.stream:
        reply = await client.chat(
            model=cfg.model, messages=messages, options=cfg.options(), stream=False
        )
        return reply.message.content or ""
    parts: list[str] = []
    async for chunk in await client.chat(
        model=cfg.model, messages=messages, options=cfg.options(), stream=True
    ):
        parts.append(chunk.message.content or "")
    return "".join(parts)


async def _score_one(
    client: Any,
    cfg: JudgeConfig,
    sem: asyncio.Semaphore,
    example: dict[str, Any],
) -> Judgment:
    prompt = build_prompt(
        str(example["instruction"]),
        str(example.get("input") or ""),
        str(example["output"]),
        str(example["response"] or ""),
    )
    async with sem:
        start = time.perf_counter()
        error: str | None = None
        reply: str | None = None
        for attempt in range(cfg.retries + 1):
            try:
                reply = await asyncio.wait_for(_chat_once(client, cfg, prompt), cfg.timeout_s)
                error = None
                break
            except Exception as exc:
                error = f"{_describe(exc)} (attempt {attempt + 1}/{cfg.retries + 1})"
                if not _is_retryable(exc) or attempt == cfg.retries:
                    break
                delay = cfg.backoff_s * (2**attempt)
                log.debug("example %s: %s; retrying in %.2fs", example["example_id"], error, delay)
                await asyncio.sleep(delay)
        latency = time.perf_counter() - start
    if error is not None:
        log.warning("example %s not judged: %s", example["example_id"], error)
    return Judgment(
        example_id=int(example["example_id"]),
        judge_model=cfg.model,
        prompt_version=PROMPT_VERSION,
        score=parse_score(reply) if error is None else None,
        raw_reply=reply if error is None else None,
        latency_s=latency,
        judged_at=_utcnow(),
        error=error,
    )


_REQUIRED_KEYS = ("example_id", "instruction", "output", "response")


async def score_examples_async(
    examples: Sequence[dict[str, Any]],
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    on_result: Callable[[Judgment], None] | None = None,
) -> list[Judgment]:
    """Score ``examples`` with at most ``cfg.concurrency`` requests in flight.

    Each example is a dict with ``example_id``, ``instruction``, ``input``, ``output`` and
    ``response``. Returns one :class:`Judgment` per example, in input order; requests
    that still fail after the retries give ``score=None`` with ``error`` set.
    """
    import ollama
    from tqdm.auto import tqdm

    for i, ex in enumerate(examples):
        missing = [k for k in _REQUIRED_KEYS if k not in ex]
        if missing:
            raise JudgeError(f"example #{i} lacks field(s) {missing}; need {_REQUIRED_KEYS}")
    if not examples:
        return []
    sem = asyncio.Semaphore(cfg.concurrency)
    client = ollama.AsyncClient(host=cfg.host, timeout=cfg.timeout_s)
    bar = tqdm(total=len(examples), desc=f"judge {cfg.model}", unit="ex", disable=not progress)

    async def run(ex: dict[str, Any]) -> Judgment:
        judgment = await _score_one(client, cfg, sem, ex)
        bar.update(1)
        if on_result is not None:
            on_result(judgment)
        return judgment

    tasks = [asyncio.create_task(run(ex)) for ex in examples]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # an error in on_result (or a cancel) stops the rest
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await client.close()


def score_examples(
    examples: Sequence[dict[str, Any]],
    cfg: JudgeConfig,
    *,
    progress: bool = True,
    on_result: Callable[[Judgment], None] | None = None,
) -> list[Judgment]:
    """Synchronous :func:`score_examples_async` (``on_result`` is called with each
    judgment as it completes, e.g. to save progress).

    Uses ``asyncio.run``; when called from inside a running event loop (a notebook, an
    async Prefect task) it runs the coroutine on a fresh loop in a worker thread.
    """

    def coro_factory() -> Any:
        return score_examples_async(examples, cfg, progress=progress, on_result=on_result)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result()
