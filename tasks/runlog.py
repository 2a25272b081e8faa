"""Run records: what each run did, kept beside the artifacts as well as in the catalog.

Every ``runs`` / ``stages`` row the pipeline writes is also written to
``artifacts/runs/<run_id>.json`` (atomically, the same values), so that the catalog can
be rebuilt from the artifacts alone (:mod:`tasks.rebuild`). On an object-store root
(``s3://…/runs``) a record is updated by compare-and-swap (a write conditional on the
ETag read), so stages of one run recorded from several machines lose nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.paths import is_remote
from tasks.catalog.values import to_json as _to_json
from tasks.catalog.values import to_utc_naive as _to_utc_naive
from tasks.catalog.values import utcnow

if TYPE_CHECKING:
    from tasks.catalog import Catalog
    from tasks.storage import ObjectRoot

RECORD_VERSION = 1

_LOCK = threading.Lock()


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
        row = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "profile": profile,
            "config": _to_json(config),
            "git_rev": git_rev,
            "started_at": _ts(utcnow()),
            "ended_at": None,
            "status": "running",
        }
        self._update(run_id, lambda rec: rec.__setitem__("run", row))
        self.catalog.upsert_rows("runs", [typed_row(row)], key=["run_id"])

    def end_run(self, run_id: str, status: str) -> None:
        ended = _ts(utcnow())

        def fn(rec: dict[str, Any]) -> None:
            if rec.get("run"):
                rec["run"].update(status=status, ended_at=ended)

        self._update(run_id, fn)
        rec = self.read(run_id) or {}
        if rec.get("run"):
            self.catalog.upsert_rows("runs", [typed_row(rec["run"])], key=["run_id"])
        else:
            self.catalog.end_run(run_id, status)

    # ------------------------------------------------------------------ run-level rows
    def record_run_rows(self, run_id: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Replace the run's rows in ``table`` (e.g. its regression gates), in the record
        and in the catalog."""
        plain = [{k: _plain_value(v) for k, v in r.items()} for r in rows]
        self._update(run_id, lambda rec: rec.setdefault("rows", {}).__setitem__(table, plain))
        self.catalog.replace_rows(table, plain, where={"run_id": run_id})

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
        """Upsert the (run, stage) row in both places; ``running`` without
        ``started_at`` starts now, other statuses end now and keep the start."""
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


def _plain_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _ts(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, dict)):
        return value.item()
    return value


def typed_row(row: dict[str, Any]) -> dict[str, Any]:
    """A record row with its timestamps as datetimes (the catalog's column types)."""
    return {
        k: (parse_ts(v) if k in _TIMESTAMPS and isinstance(v, str) else v) for k, v in row.items()
    }


#: The timestamp columns of the rows a record holds.
_TIMESTAMPS = ("started_at", "ended_at", "fetched_at")
