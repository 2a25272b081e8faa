"""Artifacts on object storage (``GPTFLOW_ARTIFACTS=s3://…``) against a local moto S3
endpoint: stage folders published with the manifest last and read back verified, a
commit killed before its manifest is never a hit, two processes racing for one key
compute it once, leases across machines (renewed, broken only when stale, by one
breaker), run records updated without losing writes, and the catalog rebuilt from S3."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from _paths import REPO


@pytest.fixture
def s3_root(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://`` artifacts root on the session's moto endpoint."""
    monkeypatch.setenv("GPTFLOW_ARTIFACTS_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("GPTFLOW_ARTIFACTS_S3_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("GPTFLOW_ARTIFACTS_S3_SECRET", s3_server.secret)
    monkeypatch.setenv("GPTFLOW_ARTIFACTS_S3_REGION", "us-east-1")
    url = f"s3://{s3_server.bucket}/art-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("GPTFLOW_ARTIFACTS", url)
    return url


def _ctx(tmp_path: Path, url: str, run_id: str, mirror: Path, db: str = "catalog.duckdb"):
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext

    return RunContext(
        run_id=run_id,
        catalog_settings=CatalogSettings(path=tmp_path / db),
        artifacts=url,
        datasets=str(tmp_path / "datasets"),
        mirror=str(mirror),
        progress=False,
    )


def _tokenize(ctx):
    from flows.config import build_config
    from tasks.stages.runner import run_stage

    cfg = build_config("smoke", [])
    return run_stage(
        ctx, "tokenize", cfg.tokenize, download=run_stage(ctx, "download", cfg.download)
    )


def _stage_message(ctx, stage: str) -> str:
    return ctx.recorder.read(ctx.run_id)["stages"][stage]["message"] or ""


# ---------------------------------------------------------------------------- paths
def test_artifacts_root_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A plain path, a file:// URL and an s3:// URL; an s3 root's local side lives in the
    cache; unsupported protocols are refused with the fix."""
    from gpt.paths import artifacts_dir, artifacts_root, default_db_path
    from tasks.store.folder import StageStore
    from tasks.store.objects import ObjectRoot, StorageError
    from tasks.store.roots import open_stage_store

    monkeypatch.setenv("GPTFLOW_ARTIFACTS", f"file://{tmp_path}/a")
    assert artifacts_root() == str(tmp_path / "a") and artifacts_dir() == tmp_path / "a"
    assert open_stage_store(artifacts_root()).root == tmp_path / "a" / "stages"
    assert type(open_stage_store(f"file://{tmp_path}/a")) is StageStore
    monkeypatch.setenv("GPTFLOW_ARTIFACTS", "s3://bucket/team/gptflow/")
    monkeypatch.delenv("GPTFLOW_DB")
    assert artifacts_root() == "s3://bucket/team/gptflow"
    local = artifacts_dir()
    assert local.is_relative_to(tmp_path / "cache") and "bucket-team-gptflow" in local.name
    assert default_db_path() == local / "gptflow.duckdb"
    root = ObjectRoot("s3://bucket/team/gptflow/")
    assert (root.bucket, root.key("stages/x")) == ("bucket", "team/gptflow/stages/x")
    with pytest.raises(StorageError, match="implemented for s3://"):
        open_stage_store("gs://bucket/prefix")
    with pytest.raises(StorageError, match="names no bucket"):
        ObjectRoot("s3:///prefix")


def test_missing_bucket_is_a_clear_error(s3_root) -> None:
    """A root in a bucket that does not exist: a miss to read, and a one-line error naming
    the bucket at the first write (nothing is created)."""
    from tasks.store.objects import StorageError
    from tasks.store.roots import open_stage_store

    store = open_stage_store("s3://no-such-bucket-here/gptflow")
    assert store.lookup("tokenize", "k") == (None, None)
    with pytest.raises(StorageError, match="does the bucket 'no-such-bucket-here' exist"):
        store.lease("tokenize", "k", "run").acquire(timeout_s=5)


# ---------------------------------------------------------------------------- stage folders
@pytest.mark.slow
def test_stage_folder_published_and_read_back_verified(
    s3_root, s3_server, mirror, tmp_path, monkeypatch
) -> None:
    """Tokenize on S3: every file and the manifest (with each object's ETag) published;
    another machine (fresh cache, fresh catalog) takes the hit from a verified download;
    a remote file changed, a manifest that no longer matches the bytes, and a missing
    file are each recomputed, with the reason on the stage row."""
    from tasks.catalog import Catalog

    ctx = _ctx(tmp_path, s3_root, "run-a", mirror)
    first = _tokenize(ctx)
    assert first.cache_hit is False
    assert Path(first.root).is_relative_to(tmp_path / "cache")
    files = json.loads(Path(first.root, "manifest.json").read_text())["files"]
    prefix = s3_root.split("/", 3)[3] + f"/stages/tokenize/{first.key}/"
    published = {k.removeprefix(prefix) for k in s3_server.keys(prefix)}
    # the rows (for a rebuild from the bucket) are recorded in produced.json, not in the
    # manifest: they carry run ids and times
    produced = json.loads(Path(first.root, "produced.json").read_text())
    rows = {rel for rel in produced["files"] if rel.startswith("rows/")}
    assert rows and not rows & set(files)
    assert published == {*files, *rows, "manifest.json", "produced.json"}
    # the ETags are records of the upload: in produced.json, beside the manifest
    assert {rel for rel, meta in produced["files"].items() if meta.get("etag")} == {*files, *rows}
    assert ctx.recorder.read("run-a")["stages"]["tokenize"]["status"] == "completed"

    # another machine: nothing local, a catalog of its own
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache-b"))
    ctx_b = _ctx(tmp_path, s3_root, "run-b", mirror, db="b.duckdb")
    hit = _tokenize(ctx_b)
    assert hit.cache_hit is True and hit.run_id == "run-a" and hit.digest == first.digest
    assert Path(hit.root).is_relative_to(tmp_path / "cache-b")
    for rel in files:
        assert Path(hit.root, rel).read_bytes() == Path(first.root, rel).read_bytes(), rel
        assert Path(hit.root, rel).stat().st_mtime_ns == produced["files"][rel]["mtime_ns"]
    n = ctx_b.catalog.query_df("SELECT count(*) n FROM instructions WHERE run_id='run-a'")
    assert n.n[0] == 36  # the rows came with the folder

    from tasks.store.objects import ObjectRoot

    stages = ObjectRoot(f"{s3_root}/stages")
    name = f"tokenize/{first.key}/" + sorted(r for r in files if r.endswith(".json"))[0]
    data = stages.get(name).data
    stages.put(name, bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
    ctx_c = _ctx(tmp_path, s3_root, "run-c", mirror, db="b.duckdb")
    again = _tokenize(ctx_c)  # the local copy of machine b is intact: S3 is checked anyway
    assert again.cache_hit is False
    assert "was changed after it was published (ETag differs)" in _stage_message(ctx_c, "tokenize")

    # a manifest whose sha256 does not match the published bytes: caught on download
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache-d"))
    mkey = f"tokenize/{first.key}/manifest.json"
    bad = json.loads(stages.get(mkey).data)
    bad["files"][sorted(bad["files"])[0]]["sha256"] = "0" * 64
    stages.put(mkey, json.dumps(bad).encode())
    ctx_d = _ctx(tmp_path, s3_root, "run-d", mirror, db="b.duckdb")
    assert _tokenize(ctx_d).cache_hit is False
    assert "does not match its manifest (sha256 differs)" in _stage_message(ctx_d, "tokenize")

    stages.delete([name])
    ctx_e = _ctx(tmp_path, s3_root, "run-e", mirror, db="b.duckdb")
    assert _tokenize(ctx_e).cache_hit is False
    assert f"{name} is missing" in _stage_message(ctx_e, "tokenize")
    ctx_f = _ctx(tmp_path, s3_root, "run-f", mirror, db="b.duckdb")
    assert _tokenize(ctx_f).cache_hit is True

    # each replaced result kept its rows (history): a rebuild from S3 has all four runs'
    from tasks.records.rebuild import rebuild_catalog

    rebuilt = Catalog(tmp_path / "rebuilt.duckdb")
    report = rebuild_catalog(rebuilt, s3_root)
    assert (report.folders, report.history, report.skipped) == (1, 3, []), report
    got = rebuilt.query_df("SELECT run_id, count(*) n FROM instructions GROUP BY 1 ORDER BY 1")
    assert dict(zip(got.run_id, got.n, strict=True)) == {
        "run-a": 36,
        "run-c": 36,
        "run-d": 36,
        "run-e": 36,
    }


#: What the ``helpers_store.py`` children import (the stage runner's run logger imports
#: Prefect), loaded once by their fork server; scikit-learn is not among them.
_CHILD_LIBS = ("torch", "numpy", "pandas", "tiktoken", "prefect", "pydantic")


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory):
    """The module's ``helpers_store.py`` children (three), each a process of its own forked
    by one fork server (``helpers_fork``) that imported their libraries once."""
    from helpers_fork import ForkServer

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ForkServer(env, tmp_path_factory.mktemp("store-children"), _CHILD_LIBS) as server:
        yield server


def _child(children, mode: str, run_id: str, url: str, tmp_path: Path, mirror: Path,
           cache: str, *extra) -> str:  # fmt: skip
    """Start ``python helpers_store.py MODE …`` (forked, in this test's environment); its
    name for ``children.finish``."""
    env = {**os.environ, "GPTFLOW_CACHE": str(tmp_path / cache), "PYTHONPATH": str(REPO)}
    argv = [
        str(Path(__file__).resolve().parent / "helpers_store.py"),
        mode,
        run_id,
        url,
        str(tmp_path / "catalog.duckdb"),
        str(tmp_path / "datasets"),
        str(mirror),
        *extra,
    ]
    children.start(run_id, argv, env=env)
    return run_id


@pytest.mark.slow
def test_commit_killed_before_the_manifest_is_not_a_hit(
    s3_root, s3_server, mirror, tmp_path, children
):
    """A process SIGKILLed when every file is uploaded but the manifest is not published
    leaves objects that are no cache hit: the next run recomputes, saying why."""
    from tasks.store.roots import open_stage_store

    name = _child(children, "kill", "run-killed", s3_root, tmp_path, mirror, "cache-killed")
    code, _, err = children.finish(name, timeout=300)
    assert code == -9, err
    prefix = s3_root.split("/", 3)[3] + "/stages/tokenize/"
    names = [k.removeprefix(prefix) for k in s3_server.keys(prefix)]
    folders = {n.split("/")[0] for n in names if "/" in n}
    assert len(folders) == 1 and names and not any(n.endswith("/manifest.json") for n in names)
    key = folders.pop()
    manifest, reason = open_stage_store(s3_root).lookup("tokenize", key)
    assert manifest is None and "no manifest.json (an unfinished commit)" in reason

    ctx = _ctx(tmp_path, s3_root, "run-after", mirror)
    out = _tokenize(ctx)  # the dead owner's lease (same host) is broken at once
    assert out.cache_hit is False and out.key == key
    assert "an unfinished commit" in _stage_message(ctx, "tokenize")
    assert open_stage_store(s3_root).lookup("tokenize", key)[0] is not None


@pytest.mark.slow
def test_two_processes_racing_for_one_key_compute_it_once(
    s3_root, s3_server, mirror, tmp_path, children
):
    """Two processes with their own local caches start tokenize on the same S3 key at
    once: one computes under the lease, the other waits and takes its result."""
    from flows.config import build_config
    from tasks.stages.runner import run_stage

    warm = _ctx(tmp_path, s3_root, "inputs", mirror, db="inputs.duckdb")
    run_stage(warm, "download", build_config("smoke", []).download)  # the local inputs, once
    go = tmp_path / "go"
    s3 = s3_root
    names = [
        _child(children, "race", f"run-{i}", s3, tmp_path, mirror, f"cache-{i}", str(go))
        for i in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    results = []
    for name in names:
        code, out, err = children.finish(name, timeout=300)
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    computed = [r for r in results if not r["cache_hit"]]
    took = [r for r in results if r["cache_hit"]]
    assert len(computed) == 1 and len(took) == 1, results
    # (whether the other one waited on the lease or came after the commit depends on the
    # machine's load; either way it did not compute)
    assert took[0]["producer"] == computed[0]["producer"]
    assert took[0]["digest"] == computed[0]["digest"]
    assert took[0]["root"] != computed[0]["root"]  # its own verified copy
    keys = s3_server.keys(s3.split("/", 3)[3] + "/stages/tokenize/")
    assert sum(k.endswith("/manifest.json") for k in keys) == 1
    assert not any(k.endswith(".lease") for k in keys)  # released


# ---------------------------------------------------------------------------- leases
def _foreign_lease(root, rel: str, ttl_s: float) -> None:
    body = {
        "token": "t-" + uuid.uuid4().hex,
        "run_id": "lost-run",
        "host": "a-machine-that-died",
        "pid": 4242,
        "acquired_at": time.time(),
        "renewed_at": time.time(),
        "ttl_s": ttl_s,
    }
    assert root.create(rel, json.dumps(body).encode()) is not None


def test_stale_lease_is_broken_by_exactly_one_waiter(s3_root, caplog) -> None:
    """A lease whose owner (on another machine) stopped renewing is broken once its TTL
    passed, by one of two waiters; the other then waits for the breaker's lease."""
    from tasks.store.object_lease import ObjectLease
    from tasks.store.objects import ObjectRoot

    root = ObjectRoot(f"{s3_root}/stages")
    _foreign_lease(root, "tokenize/k.lease", ttl_s=2.0)
    holders, most, saw, errors = [], [0], [], []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            lease = ObjectLease(root, "tokenize/k.lease", f"run-{i}", ttl_s=3.0, poll_s=0.2)
            lease.acquire(on_wait=lambda info: saw.append((i, info.run_id)))
            with lock:
                holders.append(i)
                most[0] = max(most[0], len(holders))
            time.sleep(1.0)
            with lock:
                holders.remove(i)
            lease.release()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="tasks.store.object_lease")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert most[0] == 1  # never two holders
    assert {i for i, run in saw if run == "lost-run"} == {0, 1}
    breaks = [r for r in caplog.records if "broke the stale lease" in r.getMessage()]
    assert len(breaks) == 1 and "lost-run" in breaks[0].getMessage()
    assert root.get("tokenize/k.lease") is None  # released


def test_live_lease_is_renewed_not_broken(s3_root) -> None:
    """An owner that keeps renewing holds its lease well past the TTL; a waiter times
    out instead of breaking it. Breaking is a take-over only one writer wins."""
    from tasks.store.lease import LeaseLost
    from tasks.store.object_lease import ObjectLease
    from tasks.store.objects import ObjectRoot

    root = ObjectRoot(f"{s3_root}/stages")
    owner = ObjectLease(root, "pretrain/k.lease", "owner", ttl_s=2.0, poll_s=0.2)
    assert owner.acquire() is False
    other = ObjectLease(root, "pretrain/k.lease", "other", ttl_s=2.0, poll_s=0.2)
    with pytest.raises(TimeoutError, match="owner"):
        other.acquire(timeout_s=5.0)  # 2.5 TTLs
    owner.confirm()
    got = root.get("pretrain/k.lease")
    owner.release()
    assert root.get("pretrain/k.lease") is None

    # the take-over primitive: two writers holding the same ETag, one wins
    etag = root.create("x/lease", b"stale")
    wins = [root.replace_if("x/lease", f"breaker {i}".encode(), etag) for i in range(2)]
    assert sum(w is not None for w in wins) == 1
    # an owner whose lease was taken over must not publish
    lost = ObjectLease(root, "y/k.lease", "slow", ttl_s=60)
    lost.acquire()
    lost._stop.set()  # stalled: no more renewals
    root.put("y/k.lease", got.data)  # someone else's lease now
    with pytest.raises(LeaseLost, match="must not publish"):
        lost.confirm()
    lost.release()
    assert root.get("y/k.lease") is not None  # not deleted: not ours


def test_run_record_updates_from_two_writers_lose_nothing(s3_root) -> None:
    """Stages of one run recorded by two writers at once (e.g. two machines): the
    compare-and-swap update keeps every stage row."""
    from tasks.records.runs import RunRecorder

    a, b = (RunRecorder(None, f"{s3_root}/runs") for _ in range(2))  # type: ignore[arg-type]

    def write(rec: RunRecorder, tag: str) -> None:
        for i in range(15):
            rec._update("r1", lambda r, i=i: r["stages"].__setitem__(f"{tag}{i}", {"i": i}))

    threads = [threading.Thread(target=write, args=(r, t)) for r, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(a.read("r1")["stages"]) == 30


# ---------------------------------------------------------------------------- the pipeline
@pytest.mark.slow
@pytest.mark.prefect
def test_smoke_pipeline_on_s3_then_all_hits_elsewhere(
    prefect_server, s3_root, mirror, tmp_path, monkeypatch, capsys
) -> None:
    """The smoke profile through the Prefect server with GPTFLOW_ARTIFACTS=s3://…; a second
    run from an empty local cache and catalog (another machine) is all cache hits, and
    `catalog rebuild` fills a catalog from S3 alone."""
    from benchmarks.ollama_stub import OllamaStub
    from flows.pipeline import run_pipeline
    from tasks.catalog import Catalog

    monkeypatch.setenv("GPTFLOW_MIRROR", str(mirror))
    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42")
    stub.start()
    try:
        res = run_pipeline("smoke", [f"judge.hosts={stub.host}"], progress=False)
        assert res["status"] == "completed", res
        assert not any(s["cache_hit"] for n, s in res["stages"].items() if n != "download")
        cat = Catalog(os.environ["GPTFLOW_DB"])  # machine a's catalog
        ck = cat.query_df("SELECT path FROM checkpoints WHERE run_id=?", [res["run_id"]])
        assert len(ck) >= 3 and all(p.startswith(f"{s3_root}/stages/") for p in ck.path)

        monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "machine-b"))
        monkeypatch.setenv("GPTFLOW_DB", str(tmp_path / "machine-b.duckdb"))
        chats = stub.chat_count
        res2 = run_pipeline("smoke", [f"judge.hosts={stub.host}"], progress=False)
    finally:
        stub.stop()
    assert res2["status"] == "completed", res2
    assert all(s["cache_hit"] for s in res2["stages"].values()), res2["stages"]
    assert stub.chat_count == chats
    cat_b = Catalog()
    summ = cat_b.query_df("SELECT * FROM eval_summary WHERE run_id=?", [res["run_id"]])
    assert summ.n_scored[0] == 12 and summ.mean_score[0] == 42

    from flows.cli import main

    db = tmp_path / "rebuilt.duckdb"
    assert main(["catalog", "rebuild", "--db", str(db), "--artifacts", s3_root]) == 0
    out = capsys.readouterr().out
    n_folders = len(res["stages"]) - 1  # every stage folder (download has none)
    assert f"2 runs ({len(res['stages']) + len(res2['stages'])} stage rows)" in out, out
    assert f"{n_folders} stage folders" in out and "skipped" not in out, out
    for table in ("metrics", "responses", "judgments", "spam_examples", "checkpoints"):
        sql = f"SELECT count(*) n FROM {table}"
        assert Catalog(db).query_df(sql).n[0] == cat.query_df(sql).n[0], table
    n_stages = Catalog(db).query_df("SELECT count(*) n FROM stages").n[0]
    assert n_stages == len(res["stages"]) + len(res2["stages"])
