"""Run records: what each run did, kept beside the artifacts as well as in the catalog.

Every ``runs`` / ``stages`` row is also written to ``artifacts/runs/<run_id>.json``
(first, so a locked catalog loses nothing; on an object store by compare-and-swap), so
the catalog can be rebuilt from the artifacts (:mod:`tasks.records.rebuild`). A run
ends ``completed``, ``failed`` or ``crashed`` on every path (:meth:`RunRecorder.running`),
and a stage's fate is one :class:`StageRecord`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpt.errors import CatalogError, WorkerDiedError, one_line
from gpt.fileio import atomic_open
from gpt.paths import is_remote
from tasks.catalog.values import to_json as _to_json
from tasks.catalog.values import utcnow
from tasks.jsonable import plain
from tasks.records.run_state import (
    TERMINAL,
    RunWatch,
    check_alive,
    settle_run,
    this_host,
    worker_died_reason,
)
from tasks.store.roots import root_child

if TYPE_CHECKING:
    from tasks.catalog import Catalog
    from tasks.store.objects import ObjectRoot

log = logging.getLogger(__name__)

RECORD_VERSION = 1

_LOCK = threading.Lock()

#: How far back (seconds) a run's record file is checked against the catalog.
RECENT_S = 7 * 24 * 3600.0

#: The timestamp fields of ``runs`` and ``stages`` rows.
_TIME_FIELDS = ("started_at", "ended_at", "heartbeat_at", "fetched_at")


StageStatus = Literal["running", "waiting", "cached", "completed", "skipped", "failed"]


def parse_ts(text: str | None) -> dt.datetime | None:
    """A timestamp written by this module, back as a naive UTC datetime."""
    return None if text is None else dt.datetime.fromisoformat(text)


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What happened to one stage in one run: its ``stages`` row. ``running`` without
    ``started_at`` starts now; other statuses end now (unless ``ended_at``) and keep the
    start recorded before."""

    run_id: str
    stage: str
    status: StageStatus = "running"
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    cache_hit: bool | None = None
    outputs: dict[str, Any] | None = None
    message: str | None = None

    def then(self, status: StageStatus, **changes: Any) -> StageRecord:
        """The same stage's next event: ``status`` with ``changes`` (the start kept)."""
        return dataclasses.replace(self, status=status, **changes)

    def failed(self, exc: BaseException, **changes: Any) -> StageRecord:
        """The stage failed with ``exc`` (its type and message on one line)."""
        return self.then("failed", message=failure(exc), **changes)


def failure(exc: BaseException, limit: int = 4000) -> str:
    """``Type: message`` of ``exc`` on one line (at most ``limit`` characters)."""
    return f"{type(exc).__name__}: {one_line(str(exc)) or '(no message)'}"[:limit]


def placed_records_dir(artifacts: str | Path, flow_run_id: str) -> str | Path:
    """The folder of the record and report of one placed stage's flow run,
    ``<artifacts>/runs/placed/<flow_run_id>`` (a URL on an object store)."""
    return root_child(root_child(root_child(artifacts, "runs"), "placed"), flow_run_id)


class RunRecorder:
    """Writes ``runs`` and ``stages`` rows to the catalog and to the run's record file.

    ``placed = (run_id, folder)``: that run's record file is written in ``folder``
    instead (a stage placed on another machine keeps its own copy there; the run's
    record file has a single writer, the flow, which copies the stage's row in)."""

    def __init__(
        self, catalog: Catalog, runs_dir: str | Path, placed: tuple[str, Path] | None = None
    ) -> None:
        self.catalog = catalog
        self.remote: ObjectRoot | None = None
        if is_remote(runs_dir):
            from tasks.store.objects import ObjectRoot

            self.remote = ObjectRoot(str(runs_dir))
        self.runs_dir = Path(runs_dir) if self.remote is None else Path()
        self.placed = placed

    def path(self, run_id: str) -> Path:
        """The local record file of ``run_id``."""
        if self.placed is not None and self.placed[0] == run_id:
            return self.placed[1] / f"{run_id}.json"
        return self.runs_dir / f"{run_id}.json"

    def _fetch(self, run_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The record (None when missing or unreadable) and, on an object store, the
        ETag it was read at (None: no object)."""
        if self.remote is None:
            try:
                return json.loads(self.path(run_id).read_text(encoding="utf-8")), None
            except (OSError, ValueError):
                return None, None
        got = self.remote.get(f"{run_id}.json")
        if got is None:
            return None, None
        try:
            return json.loads(got.data), got.etag
        except ValueError:
            return None, got.etag

    def read(self, run_id: str) -> dict[str, Any] | None:
        """The record of ``run_id`` (None when missing or unreadable)."""
        return self._fetch(run_id)[0]

    def where(self, run_id: str) -> str | Path:
        """Where the record of ``run_id`` is (for messages)."""
        return self.remote.url_of(f"{run_id}.json") if self.remote else self.path(run_id)

    def records(self) -> list[dict[str, Any]]:
        """Every readable run record, oldest run first (unreadable ones are logged)."""
        if self.remote is not None:
            names = [n for n in self.remote.list() if "/" not in n and n.endswith(".json")]
        else:
            names = [p.name for p in self.runs_dir.glob("*.json")]
        records = []
        for run_id in sorted(n.removesuffix(".json") for n in names):
            rec = self.read(run_id)
            if isinstance(rec, dict) and rec.get("run"):
                records.append(rec)
            else:
                log.warning("skipping unreadable run record %s", self.where(run_id))
        return sorted(records, key=lambda r: (r["run"].get("started_at") or "", r["run"]["run_id"]))

    def _update(self, run_id: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Read the record, change it with ``fn`` and write it back: a local file under
        this process's lock; an object only if nobody wrote it in between (a
        compare-and-swap, across threads as across machines), else again."""
        with _LOCK if self.remote is None else contextlib.nullcontext():
            for _ in range(50):
                rec, etag = self._fetch(run_id)
                rec = rec or {"version": RECORD_VERSION, "run": None, "stages": {}}
                fn(rec)
                if self._write(run_id, json.dumps(rec, indent=1, sort_keys=True), etag):
                    return
                time.sleep(random.uniform(0.01, 0.1))  # another writer won: read again
        from tasks.store.objects import StorageError

        raise StorageError(f"could not update the run record {self.where(run_id)}")

    def _write(self, run_id: str, text: str, etag: str | None) -> bool:
        """Write the record: a local file atomically; an object only if it is still the
        version ``etag`` (None: only if there is none). False when another writer won."""
        if self.remote is not None:
            name = f"{run_id}.json"
            if etag is None:
                return self.remote.create(name, text.encode()) is not None
            return self.remote.replace_if(name, text.encode(), etag) is not None
        with atomic_open(self.path(run_id), "w", encoding="utf-8", fsync=False) as fh:
            fh.write(text)
        return True

    # ------------------------------------------------------------------ runs
    def start_run(
        self,
        run_id: str,
        *,
        flow_run_id: str | None,
        profile: str | None,
        config: dict[str, Any] | None,
        git_rev: str | None,
    ) -> None:
        """Record the run as ``running`` here, now, in this process (record file first,
        then the catalog, which is published)."""
        now = plain(utcnow())
        row = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "profile": profile,
            "config": _to_json(config),
            "git_rev": git_rev,
            "started_at": now,
            "ended_at": None,
            "status": "running",
            "message": None,
            "heartbeat_at": now,
            "host": this_host(),
            "pid": os.getpid(),
        }
        self._update(run_id, lambda rec: rec.__setitem__("run", row))
        put_run(self.catalog, row)
        self.catalog.publish()

    def end_run(
        self, run_id: str, status: str, message: str | None = None, *, catalog: bool = True
    ) -> bool:
        """Record the run's final ``status`` and why (``message``): in the record file,
        then (unless ``catalog`` is false) in the catalog. Returns False when only the
        record was written (the catalog's error is logged: a run's end is never lost to
        a locked catalog; the next run copies it in)."""
        ended = plain(utcnow())

        def fn(rec: dict[str, Any]) -> None:
            if rec.get("run"):
                rec["run"].update(status=status, ended_at=ended, message=message)

        self._update(run_id, fn)
        rec = self.read(run_id) or {}
        if not catalog:
            return False
        try:
            if rec.get("run"):
                put_run(self.catalog, rec["run"])
            else:
                self.catalog.end_run(run_id, status, message)
            self.catalog.publish()
        except Exception as exc:
            log.error(
                "run %s ended %s, but the catalog %s could not record it (%s); its record "
                "%s says so, and the next run (or `gptflow catalog rebuild`) brings the "
                "catalog in line",
                run_id,
                status,
                self.catalog.location,
                exc,
                self.where(run_id),
            )
            return False
        return True

    def beat(self, run_id: str) -> None:
        """The run's heartbeat: ``heartbeat_at`` = now, in the record and the catalog (a
        run another process took for dead is running again)."""
        now = plain(utcnow())
        alive = {"heartbeat_at": now, "status": "running", "ended_at": None, "message": None}

        def fn(rec: dict[str, Any]) -> None:
            run = rec.get("run")
            if run and run.get("status") in ("running", "crashed"):
                run.update(alive)

        self._update(run_id, fn)
        run = (self.read(run_id) or {}).get("run")
        if run and run.get("status") == "running":
            put_run(self.catalog, run)
            self.catalog.publish(soon=True)

    @contextlib.contextmanager
    def running(
        self,
        run_id: str,
        *,
        flow_run_id: str | None,
        profile: str | None,
        config: dict[str, Any] | None,
        git_rev: str | None,
    ) -> Iterator[RunWatch]:
        """Record the run for the ``with`` block: ``running`` (beating, its starter
        watched) inside it; ``completed`` when the block ends, else ``failed`` or
        ``crashed`` with the reason (:func:`run_outcome`) — also when recording the start
        fails (e.g. a locked catalog). Runs that died before are recorded ``crashed``."""
        try:
            self.start_run(
                run_id, flow_run_id=flow_run_id, profile=profile, config=config, git_rev=git_rev
            )
        except BaseException as exc:  # a catalog that failed now is not tried again
            self.end_run(run_id, *run_outcome(exc), catalog=not isinstance(exc, CatalogError))
            raise
        try:
            self.reap(current=run_id)
        except Exception as exc:  # telling other runs' fate must not stop this one
            log.warning("could not check for runs that died: %s", exc)
        watch = RunWatch(lambda: self.beat(run_id)).start()
        try:
            yield watch
        except BaseException as exc:
            watch.stop()
            self.end_run(run_id, *run_outcome(exc))
            raise
        watch.stop()
        self.end_run(run_id, "completed")

    def reap(self, current: str | None = None) -> list[str]:
        """Bring the catalog in line with how runs other than ``current`` really ended:
        a run it shows ``running`` whose process is gone is recorded ``crashed`` with the
        reason (record file too, and its Prefect flow run when that still looks alive);
        the end of a run that only its record file holds (the catalog was locked then; a
        record changed in the last :data:`RECENT_S` seconds) is copied in. Returns their
        ids."""
        running = self.catalog.query_rows(
            "SELECT * FROM runs WHERE status = 'running' AND run_id IS DISTINCT FROM ?",
            [current],
        )
        ends: dict[str, dict[str, Any]] = {}
        for row in running:
            run_id = str(row["run_id"])
            recorded = (self.read(run_id) or {}).get("run") or {}
            base = recorded or {k: plain(v) for k, v in row.items()}
            final = base if base.get("status") in TERMINAL else settle_run(base)
            if final.get("status") == "running":
                continue
            if recorded and recorded.get("status") == "running":
                fields = {k: final[k] for k in ("status", "message", "ended_at")}
                self._update(run_id, lambda rec, f=fields: rec["run"].update(f))
                _crash_flow_run(final.get("flow_run_id"), final.get("message"))
            ends[run_id] = final
        ends.update(self._ends_missing_in_catalog(current, skip=set(ends)))
        for run_id, final in ends.items():
            put_run(self.catalog, final)
            log.warning("run %s: recorded %s (%s)", run_id, final["status"], final.get("message"))
        if ends:
            self.catalog.publish(soon=True)
        return sorted(ends)

    def _ends_missing_in_catalog(self, current: str | None, skip: set[str]) -> dict[str, dict]:
        """Ended runs of recently changed local record files whose status the catalog
        does not hold."""
        if self.remote is not None or not self.runs_dir.is_dir():
            return {}
        since = time.time() - RECENT_S
        recent = {}
        for path in self.runs_dir.glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stem not in skip and path.stem != current and path.stat().st_mtime > since:
                    run = (self.read(path.stem) or {}).get("run") or {}
                    if run.get("status") in TERMINAL and run.get("run_id") == path.stem:
                        recent[path.stem] = run
        if not recent:
            return {}
        marks = ", ".join("?" for _ in recent)
        have = self.catalog.query_rows(
            f"SELECT run_id, status FROM runs WHERE run_id IN ({marks})", list(recent)
        )
        known = {r["run_id"]: r["status"] for r in have}
        return {k: run for k, run in recent.items() if known.get(k) != run["status"]}

    # ------------------------------------------------------------------ run-level rows
    def record_run_rows(self, run_id: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Replace the run's rows in ``table`` (e.g. its regression gates), in the record
        and in the catalog."""
        values = [plain(dict(r)) for r in rows]
        self._update(run_id, lambda rec: rec.setdefault("rows", {}).__setitem__(table, values))
        self.catalog.replace_rows(table, values, where={"run_id": run_id})
        self.catalog.publish(soon=True)

    # ------------------------------------------------------------------ sources
    def record_sources(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """The downloaded files the run used (``sources`` rows: name, url, sha256, bytes,
        fetched_at), in the run's record as well as the catalog: the record keeps the
        trust-on-first-use digests when the catalog is lost (``gptflow catalog rebuild``
        restores ``sources`` from it)."""
        values = [plain(dict(r)) for r in rows]
        self._update(
            run_id,
            lambda rec: rec.setdefault("sources", {}).update({r["name"]: r for r in values}),
        )
        self.catalog.upsert_rows("sources", [typed_row(r) for r in values], key=["name"])

    # ------------------------------------------------------------------ stages
    def record(self, row: StageRecord) -> None:
        """Write the stage's ``row`` in both places (replacing its earlier one) and
        publish the catalog. A stage about to run stops the run if the process that
        started it died; a failure then says so, whatever error the stage saw."""
        if row.status == "running":
            check_alive()
        died = worker_died_reason() if row.status == "failed" else None
        now = utcnow()
        started, ended = row.started_at, row.ended_at
        if row.status == "running":
            started = started or now
        else:
            ended = ended or now
            if started is None:
                prev = ((self.read(row.run_id) or {}).get("stages") or {}).get(row.stage) or {}
                started = parse_ts(prev.get("started_at"))
        data = {
            **dataclasses.asdict(row),
            "started_at": plain(started),
            "ended_at": plain(ended),
            "outputs": _to_json(row.outputs),
            "message": f"WorkerDiedError: {died}" if died is not None else row.message,
        }
        self._update(row.run_id, lambda rec: rec["stages"].__setitem__(row.stage, data))
        self.catalog.replace_rows(
            "stages", [typed_row(data)], where={"run_id": row.run_id, "stage": row.stage}
        )
        self.catalog.publish(soon=True)


def run_outcome(exc: BaseException | None) -> tuple[str, str | None]:
    """``(status, message)`` a run ends with when its block ended with ``exc``:
    ``completed``; ``crashed`` when the process that started it died, or when the process
    was stopped (a signal, an interrupt); else ``failed`` with the error."""
    if exc is None:
        return "completed", None
    died = worker_died_reason()
    if died is not None:
        return "crashed", died
    if isinstance(exc, WorkerDiedError):
        return "crashed", str(exc)
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, a signal
        return "crashed", f"the run's process was stopped: {failure(exc, 2000)}"
    return "failed", failure(exc, 2000)


def _crash_flow_run(flow_run_id: Any, message: str | None) -> None:
    """Set the Prefect flow run of a run found dead to Crashed with ``message``, when it
    is not in a final state yet (nobody else will: its process is gone). Best effort:
    only inside a Prefect run, where the API is reachable."""
    if not isinstance(flow_run_id, str) or not flow_run_id:
        return
    try:
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception as exc:  # an id that is no flow run, a server that is down
        log.debug("could not mark flow run %s crashed: %s", flow_run_id, exc)


def typed_row(row: dict[str, Any]) -> dict[str, Any]:
    """A record row with its timestamps as datetimes (the catalog's column types)."""
    return {
        k: (parse_ts(v) if k in _TIME_FIELDS and isinstance(v, str) else v) for k, v in row.items()
    }


def put_run(catalog: Catalog, run: dict[str, Any]) -> None:
    """Write a record's run row into ``runs`` (replacing the run's row)."""
    catalog.upsert_rows("runs", [typed_row(run)], key=["run_id"])
