"""The judge's Ollama servers: which answer and hold which models (and which digest of
each), and spreading requests over them.

:func:`check_host` asks one server for its models and their digests (pulling missing
ones on request); :func:`preflight` checks every configured server before any scoring;
:func:`route` decides which host serves which model and the one digest each model is
judged with (a host holding another digest of a model, e.g. re-pulled on one machine
only, is not used for it, so one model's judgments never mix two models).

:class:`HostPool` hands out request slots: at most ``per_host`` requests in flight on
each host, the least busy live host that serves the wanted model first (hosts with
recent connection errors last). A host that fails ``dead_after`` requests in a row with
a connection error (refused, reset, closed mid-reply) is taken out of rotation for the
rest of the call; the requests it was serving go to the other hosts (see
:func:`gpt.eval.judge.scoring.score_examples_async`).
Timeouts and 5xx replies do not mark a host dead: the server is there, the model is
slow or failing, and the request's own retries handle it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpt.errors import JudgeError, ModelNotPulledError, OllamaUnreachableError
from gpt.eval.judge.settings import JudgeConfig

log = logging.getLogger(__name__)

__all__ = [
    "Host",
    "HostPool",
    "HostStatus",
    "NoLiveHostError",
    "Routing",
    "check_host",
    "is_connection_error",
    "not_pulled_error",
    "preflight",
    "pull_model",
    "route",
    "unreachable_error",
]


class NoLiveHostError(JudgeError):
    """Every judge host serving the model was marked dead during the call."""


def is_connection_error(exc: BaseException) -> bool:
    """The server could not be reached or dropped the connection (not a timeout, not an
    HTTP error reply)."""
    import httpx

    return isinstance(
        exc,
        ConnectionError | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ConnectTimeout,
    )


@dataclass(eq=False)
class Host:
    """One Ollama server and what the pool knows about it."""

    url: str
    """Server URL."""
    client: Any
    """Its ``ollama.AsyncClient``."""
    models: frozenset[str] | None = None
    """Judge models it serves (``None``: every model)."""
    in_flight: int = 0
    """Requests holding a slot now."""
    sent: int = 0
    """Slots handed out so far (spreads ties evenly)."""
    failures: int = 0
    """Connection errors in a row (reset by any reply, HTTP errors included)."""
    dead: str | None = None
    """Why the host was taken out of rotation; ``None`` while it is live."""
    answered: int = 0
    """Replies received (HTTP errors not counted)."""

    def serves(self, model: str) -> bool:
        return self.dead is None and (self.models is None or model in self.models)


@dataclass
class HostPool:
    """Bounded concurrency per host, least-busy placement, dead-host bookkeeping."""

    hosts: list[Host]
    """The servers, in configuration order."""
    per_host: int
    """Maximum requests in flight on one host."""
    dead_after: int
    """Connection errors in a row after which a host is taken out of rotation."""
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)

    def live_for(self, model: str, *, besides: Host | None = None) -> list[Host]:
        """Live hosts serving ``model`` (other than ``besides``)."""
        return [h for h in self.hosts if h.serves(model) and h is not besides]

    def _no_live(self, model: str) -> NoLiveHostError:
        why = "; ".join(
            f"{h.url}: {h.dead}" for h in self.hosts if h.models is None or model in h.models
        )
        return NoLiveHostError(f"no live judge host serves '{model}' any more ({why})")

    async def acquire(self, model: str) -> Host:
        """A slot on the least busy live host serving ``model``; waits while all are busy.

        Raises :class:`NoLiveHostError` when every such host is dead.
        """
        async with self._cond:
            while True:
                live = self.live_for(model)
                if not live:
                    raise self._no_live(model)
                free = [h for h in live if h.in_flight < self.per_host]
                if free:
                    # hosts with recent connection errors last, then the least busy
                    host = min(free, key=lambda h: (h.failures, h.in_flight, h.sent))
                    host.in_flight += 1
                    host.sent += 1
                    return host
                await self._cond.wait()

    async def release(self, host: Host) -> None:
        """Give the slot back."""
        async with self._cond:
            host.in_flight -= 1
            self._cond.notify_all()

    def answered(self, host: Host, *, content: bool = True) -> None:
        """The host replied (``content`` false: with an HTTP error): its run of connection
        errors ends."""
        host.failures = 0
        if content:
            host.answered += 1

    async def connection_failed(self, host: Host, detail: str) -> None:
        """Count a connection error; the ``dead_after``-th in a row marks the host dead."""
        async with self._cond:
            host.failures += 1
            if host.dead is None and host.failures >= self.dead_after:
                host.dead = f"{host.failures} connection errors in a row, last: {detail}"
                log.warning("judge host %s taken out of rotation: %s", host.url, host.dead)
                self._cond.notify_all()  # waiters re-check which hosts are live

    def down(self) -> list[str]:
        """``url: why`` of each host marked dead."""
        return [f"{h.url}: {h.dead}" for h in self.hosts if h.dead is not None]

    @classmethod
    def of(
        cls,
        clients: dict[str, Any],
        *,
        routes: dict[str, Collection[str]] | None,
        per_host: int,
        dead_after: int,
    ) -> HostPool:
        """A pool over ``clients`` (url → client); ``routes`` (url → models) limits which
        models each host serves (hosts missing from it are not used)."""
        hosts = []
        for url, client in clients.items():
            if routes is not None and url not in routes:
                continue
            models = frozenset(routes[url]) if routes is not None else None
            hosts.append(Host(url=url, client=client, models=models))
        return cls(hosts=hosts, per_host=per_host, dead_after=dead_after)


# --------------------------------------------------------------------------- preflight


@dataclass
class HostStatus:
    """What :func:`check_host` found on one host."""

    url: str
    """Server URL."""
    models: tuple[str, ...] = ()
    """Judge models present on it (after any auto-pull)."""
    missing: tuple[str, ...] = ()
    """Judge models it lacks."""
    error: str | None = None
    """Why it could not be used (unreachable, not an Ollama server); ``None`` when up."""
    digests: dict[str, str] = field(default_factory=dict)
    """The digest of each model present, as the server reports it (``/api/tags``)."""

    @property
    def up(self) -> bool:
        return self.error is None


def _names_match(wanted: str, present: str) -> bool:
    """Ollama treats ``llama3`` and ``llama3:latest`` as the same model."""

    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return norm(wanted) == norm(present)


def unreachable_error(statuses: Sequence[HostStatus]) -> OllamaUnreachableError:
    """The error when none of ``statuses`` is up, with each host's reason and the fix."""
    fix = "start it with `ollama serve` (or set OLLAMA_HOST / judge.hosts)"
    if len(statuses) == 1:
        s = statuses[0]
        return OllamaUnreachableError(f"Ollama is not reachable at {s.url} — {fix} [{s.error}]")
    where = "; ".join(f"{s.url} [{s.error}]" for s in statuses)
    return OllamaUnreachableError(f"Ollama is not reachable at any judge host: {where} — {fix}")


def not_pulled_error(model: str, urls: Sequence[str]) -> ModelNotPulledError:
    """The error when no reachable host (``urls``) holds ``model``, with the fix."""
    where = f"host {urls[0]}" if len(urls) == 1 else f"hosts {', '.join(urls)}"
    return ModelNotPulledError(
        f"model '{model}' is not pulled — run `ollama pull {model}` "
        f"(or set judge.auto_pull) [{where}]"
    )


def _show_digest(show: Any) -> str:
    """A digest for a model the server resolves by ``/api/show`` only (an alias): the
    hash of what it shows, which changes when the model is pulled again."""
    body = show.model_dump(mode="json") if hasattr(show, "model_dump") else dict(show)
    text = json.dumps(body, sort_keys=True, default=str)
    return "show:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _find(client: Any, url: str, models: Sequence[str]) -> HostStatus:
    """Which of ``models`` the server at ``url`` holds, with their digests."""
    import httpx
    import ollama

    try:
        listing = client.list()
    except (ConnectionError, httpx.TransportError) as exc:
        return HostStatus(url, error=str(exc) or type(exc).__name__)
    except ollama.ResponseError as exc:
        return HostStatus(url, error=f"GET /api/tags answered {exc}; is this an Ollama server?")
    present, missing, digests = [], [], {}
    for model in models:
        entry = next((m for m in listing.models if _names_match(model, m.model or "")), None)
        if entry is not None:
            present.append(model)
            digests[model] = entry.digest or _show_digest(entry)
            continue
        try:  # not listed under that name: the server resolves aliases and tags
            digests[model] = _show_digest(client.show(model))
            present.append(model)
        except ollama.ResponseError as exc:
            if exc.status_code != 404:
                log.warning("judge host %s failed to show '%s': %s", url, model, exc)
            missing.append(model)
        except (ConnectionError, httpx.TransportError) as exc:
            return HostStatus(url, error=str(exc) or type(exc).__name__)
    return HostStatus(url, models=tuple(present), missing=tuple(missing), digests=digests)


def check_host(
    url: str,
    models: Sequence[str],
    *,
    timeout_s: float,
    auto_pull: bool = False,
    progress: bool = True,
) -> HostStatus:
    """Whether ``url`` answers like an Ollama server, and which of ``models`` it holds
    with which digest (pulling the missing ones first with ``auto_pull``)."""
    import ollama

    client = ollama.Client(host=url, timeout=min(timeout_s, 30.0))
    try:
        status = _find(client, url, models)
        if status.up and status.missing and auto_pull:
            for model in status.missing:
                pull_model(url, model, timeout_s=timeout_s, progress=progress)
            status = _find(client, url, models)
    finally:
        client.close()
    return status


def preflight(cfg: JudgeConfig, *, progress: bool = True) -> list[HostStatus]:
    """Check which of ``cfg.hosts`` answer and which of ``cfg.models`` each holds (and
    which digest), before any scoring.

    Passes when at least one host is up and every model is on some live host; hosts
    that are down or lack a model are logged (:func:`route` leaves them out). Raises
    :class:`~gpt.errors.OllamaUnreachableError` (no host answers) or
    :class:`~gpt.errors.ModelNotPulledError` with the command that fixes it; with
    ``cfg.auto_pull`` a missing model is pulled on every reachable host lacking it
    (progress bar) first.
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


@dataclass(frozen=True)
class Routing:
    """Which live host serves which judge model, and the digest each model is judged
    with."""

    routes: dict[str, tuple[str, ...]]
    """Host URL → the models it serves (pass as ``routes`` to the scoring)."""
    digests: dict[str, str]
    """Model → its digest: the one held by the first live host (in configuration order)
    that holds the model."""
    left_out: list[str]
    """``url: why`` for each host left out of a model because it holds another digest."""


def route(statuses: Sequence[HostStatus], models: Sequence[str]) -> Routing:
    """The routing for ``models`` over the live hosts of ``statuses``: each model goes
    only to hosts holding the same digest of it as the first host that has it."""
    live = [s for s in statuses if s.up]
    digests: dict[str, str] = {}
    served: dict[str, list[str]] = {s.url: [] for s in live}
    left_out: list[str] = []
    for model in models:
        holders = [s for s in live if model in s.models]
        if not holders:
            continue
        digests[model] = holders[0].digests.get(model, "")
        for s in holders:
            digest = s.digests.get(model, "")
            if digest == digests[model]:
                served[s.url].append(model)
                continue
            why = (
                f"{s.url}: holds another '{model}' (digest {digest[:19]}, not "
                f"{digests[model][:19]} as on {holders[0].url}); pull the same model on "
                f"every judge host (`ollama pull {model}`)"
            )
            log.warning("judge host left out for %s", why)
            left_out.append(why)
    routes = {url: tuple(ms) for url, ms in served.items() if ms}
    return Routing(routes=routes, digests=digests, left_out=left_out)


def pull_model(host: str, model: str, *, timeout_s: float, progress: bool = True) -> None:
    """``ollama pull`` ``model`` on ``host``, with a byte progress bar per layer."""
    import httpx
    import ollama
    from tqdm.auto import tqdm

    log.info("pulling %s on %s", model, host)
    client = ollama.Client(host=host, timeout=httpx.Timeout(timeout_s, read=None))
    bars: dict[str, Any] = {}
    last_status = ""
    try:
        for part in client.pull(model, stream=True):
            last_status = part.status or last_status
            if part.digest and part.total:
                bar = bars.get(part.digest)
                if bar is None:
                    short = part.digest.removeprefix("sha256:")[:12]
                    bar = tqdm(
                        total=part.total,
                        desc=f"pull {short}",
                        unit="B",
                        unit_scale=True,
                        disable=not progress,
                        leave=False,
                    )
                    bars[part.digest] = bar
                if part.completed is not None:
                    bar.update(max(0, part.completed - bar.n))
            elif part.status:
                log.info("pull %s: %s", model, part.status)
    except ollama.ResponseError as exc:
        raise ModelNotPulledError(
            f"pulling model '{model}' on {host} failed: {exc.error} — "
            f"check the model name or run `ollama pull {model}` yourself"
        ) from None
    except (ConnectionError, httpx.TransportError) as exc:
        raise unreachable_error([HostStatus(host, error=str(exc))]) from None
    finally:
        for bar in bars.values():
            bar.close()
        client.close()
    if last_status != "success":
        raise ModelNotPulledError(
            f"pulling model '{model}' on {host} ended with status "
            f"{last_status!r} instead of 'success' — run `ollama pull {model}`"
        )
