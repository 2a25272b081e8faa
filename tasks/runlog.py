"""Run records: what each run did, kept beside the artifacts as well as in the catalog.

Every ``runs`` / ``stages`` row the pipeline writes is also written to
``artifacts/runs/<run_id>.json`` (atomically, the same values), so that the catalog can
be rebuilt from the artifacts alone (:mod:`tasks.rebuild`). On an object-store root
(``s3://…/runs``) a record is updated by compare-and-swap (a write conditional on the
ETag read), so stages of one run recorded from several machines lose nothing.

A run ends in ``completed``, ``failed`` or ``crashed`` on every path
(:meth:`RunRecorder.running`), with the reason in ``message``; while it runs it beats
(:mod:`tasks.run_state`), so a run whose process died is told from a running one, and the
next run records it ``crashed`` (:meth:`RunRecorder.reap`). The run record file is written
first: when the catalog cannot be written (locked), the record still tells how the run
ended, and the next run or a rebuild brings the catalog in line. Each run and stage
event publishes the catalog (readers see it at once).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import CatalogError, WorkerDiedError
from gpt.paths import is_remote
from tasks.catalog.values import to_json as _to_json
from tasks.catalog.values import to_utc_naive as _to_utc_naive
from tasks.catalog.values import utcnow
from tasks.run_state import (
    TERMINAL,
    RunWatch,
    check_alive,
    settle_run,
    this_host,
    worker_died_reason,
)

if TYPE_CHECKING:
    from tasks.catalog import Catalog
    from tasks.storage import ObjectRoot

log = logging.getLogger(__name__)

RECORD_VERSION = 1

_LOCK = threading.Lock()

#: How far back (seconds) a run's record file is checked against the catalog.
RECENT_S = 7 * 24 * 3600.0

#: The timestamp fields of ``runs`` and ``stages`` rows.
_TIME_FIELDS = ("started_at", "ended_at", "heartbeat_at", "fetched_at")


def _ts(value: dt.datetime | None) -> str | None:
    value = _to_utc_naive(value)
    return None if value is None else value.isoformat(sep=" ")


def parse_ts(text: str | None) -> dt.datetime | None:
    """A timestamp written by this module, back as a naive UTC datetime."""
    return None if text is None else dt.datetime.fromisoformat(text)


class RunRecorder:
    """Writes ``runs`` and ``stages`` rows to the catalog and to the run's record file."""

    def __init__(self, catalog: Catalog, runs_dir: str | Path) -> None:
        self.catalog = catalog
        self.remote: ObjectRoot | None = None
        if is_remote(runs_dir):
            from tasks.storage import ObjectRoot

            self.remote = ObjectRoot(str(runs_dir))
        self.runs_dir = Path(runs_dir) if self.remote is None else Path()

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def read(self, run_id: str) -> dict[str, Any] | None:
        if self.remote is not None:
            got = self.remote.get(f"{run_id}.json")
            try:
                return None if got is None else json.loads(got.data)
            except (ValueError, UnicodeDecodeError):
                return None
        try:
            return json.loads(self.path(run_id).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _update_remote(self, run_id: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Read, change, write back only if nobody wrote in between; else again."""
        assert self.remote is not None
        name = f"{run_id}.json"
        for _ in range(50):
            got = self.remote.get(name)
            try:
                rec = json.loads(got.data) if got is not None else None
            except (ValueError, UnicodeDecodeError):
                rec = None
            rec = rec or {"version": RECORD_VERSION, "run": None, "stages": {}}
            fn(rec)
            body = json.dumps(rec, indent=1, sort_keys=True).encode()
            if got is None:
                written = self.remote.create(name, body)
            else:
                written = self.remote.replace_if(name, body, got.etag)
            if written is not None:
                return
            time.sleep(random.uniform(0.01, 0.1))  # another writer won: read again
        from tasks.storage import StorageError

        raise StorageError(f"could not update the run record {self.remote.url_of(name)}")

    def _update(self, run_id: str, fn: Any) -> None:
        if self.remote is not None:
            with _LOCK:
                self._update_remote(run_id, fn)
            return
        with _LOCK:
            rec = self.read(run_id) or {"version": RECORD_VERSION, "run": None, "stages": {}}
            fn(rec)
            path = self.path(run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(rec, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, path)

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
        now = _ts(utcnow())
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
        self.catalog.upsert_rows("runs", [typed_row(row)], key=["run_id"])
        self.catalog.publish()

    def end_run(
        self, run_id: str, status: str, message: str | None = None, *, catalog: bool = True
    ) -> bool:
        """Record the run's final ``status`` and why (``message``): in the record file,
        then (unless ``catalog`` is false) in the catalog. Returns False when only the
        record was written (the catalog's error is logged: a run's end is never lost to
        a locked catalog; the next run copies it in)."""
        ended = _ts(utcnow())

        def fn(rec: dict[str, Any]) -> None:
            if rec.get("run"):
                rec["run"].update(status=status, ended_at=ended, message=message)

        self._update(run_id, fn)
        rec = self.read(run_id) or {}
        if not catalog:
            return False
        try:
            if rec.get("run"):
                self.catalog.upsert_rows("runs", [typed_row(rec["run"])], key=["run_id"])
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
                self.remote.url_of(f"{run_id}.json") if self.remote else self.path(run_id),
            )
            return False
        return True

    def beat(self, run_id: str) -> None:
        """The run's heartbeat: ``heartbeat_at`` = now, in the record and the catalog (a
        run another process took for dead is running again)."""
        now = _ts(utcnow())
        alive = {"heartbeat_at": now, "status": "running", "ended_at": None, "message": None}

        def fn(rec: dict[str, Any]) -> None:
            run = rec.get("run")
            if run and run.get("status") in ("running", "crashed"):
                run.update(alive)

        self._update(run_id, fn)
        run = (self.read(run_id) or {}).get("run")
        if run and run.get("status") == "running":
            self.catalog.upsert_rows("runs", [typed_row(run)], key=["run_id"])
            self.catalog.publish()

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
        df = self.catalog.query_df(
            "SELECT * FROM runs WHERE status = 'running' AND run_id IS DISTINCT FROM ?",
            [current],
        )
        ends: dict[str, dict[str, Any]] = {}
        for row in df.to_dict("records"):
            run_id = str(row["run_id"])
            recorded = (self.read(run_id) or {}).get("run") or {}
            base = recorded or {k: _plain_value(v) for k, v in row.items()}
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
            self.catalog.upsert_rows("runs", [typed_row(final)], key=["run_id"])
            log.warning("run %s: recorded %s (%s)", run_id, final["status"], final.get("message"))
        if ends:
            self.catalog.publish()
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
        have = self.catalog.query_df(
            f"SELECT run_id, status FROM runs WHERE run_id IN ({marks})", list(recent)
        )
        known = dict(zip(have["run_id"], have["status"], strict=True))
        return {k: run for k, run in recent.items() if known.get(k) != run["status"]}

    # ------------------------------------------------------------------ run-level rows
    def record_run_rows(self, run_id: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Replace the run's rows in ``table`` (e.g. its regression gates), in the record
        and in the catalog."""
        plain = [{k: _plain_value(v) for k, v in r.items()} for r in rows]
        self._update(run_id, lambda rec: rec.setdefault("rows", {}).__setitem__(table, plain))
        self.catalog.replace_rows(table, plain, where={"run_id": run_id})
        self.catalog.publish()

    # ------------------------------------------------------------------ sources
    def record_sources(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """The downloaded files the run used (``sources`` rows: name, url, sha256, bytes,
        fetched_at), in the run's record as well as the catalog: the record keeps the
        trust-on-first-use digests when the catalog is lost (``gptflow catalog rebuild``
        restores ``sources`` from it)."""
        plain = [{k: _plain_value(v) for k, v in r.items()} for r in rows]
        self._update(
            run_id,
            lambda rec: rec.setdefault("sources", {}).update({r["name"]: r for r in plain}),
        )
        self.catalog.upsert_rows("sources", [typed_row(r) for r in plain], key=["name"])

    # ------------------------------------------------------------------ stages
    def record_stage(
        self,
        run_id: str,
        stage: str,
        *,
        status: str,
        started_at: dt.datetime | None = None,
        ended_at: dt.datetime | None = None,
        cache_hit: bool | None = None,
        outputs: dict[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        """Upsert the (run, stage) row in both places and publish the catalog; ``running``
        without ``started_at`` starts now, other statuses end now and keep the start. A
        stage about to run stops the run if the process that started it died."""
        if status == "running":
            check_alive()
        died = worker_died_reason() if status == "failed" else None
        if died is not None:  # whatever error the stage saw (a broken pipe): this is why
            message = f"WorkerDiedError: {died}"
        now = utcnow()
        prev = ((self.read(run_id) or {}).get("stages") or {}).get(stage) or {}
        if status == "running":
            started_at = started_at or now
        else:
            ended_at = ended_at or now
            if started_at is None and prev.get("started_at"):
                started_at = parse_ts(prev["started_at"])
        row = {
            "run_id": run_id,
            "stage": stage,
            "status": status,
            "started_at": _ts(started_at),
            "ended_at": _ts(ended_at),
            "cache_hit": cache_hit,
            "outputs": _to_json(outputs),
            "message": message,
        }
        self._update(run_id, lambda rec: rec["stages"].__setitem__(stage, row))
        self.catalog.replace_rows(
            "stages", [typed_row(row)], where={"run_id": run_id, "stage": stage}
        )
        self.catalog.publish()


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of ``exc`` on one line (at most ``limit`` characters)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:limit]


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
        return "crashed", f"the run's process was stopped: {one_line(exc)}"
    return "failed", one_line(exc)


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


def _plain_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _ts(value)
    if isinstance(value, float) and value != value:  # NaN: a missing value in a frame
        return None
    if value is not None and type(value).__name__ in ("NaTType", "NAType"):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, dict)):
        return value.item()
    return value


def typed_row(row: dict[str, Any]) -> dict[str, Any]:
    """A record row with its timestamps as datetimes (the catalog's column types)."""
    return {
        k: (parse_ts(v) if k in _TIME_FIELDS and isinstance(v, str) else v) for k, v in row.items()
    }
