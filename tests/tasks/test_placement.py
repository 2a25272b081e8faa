"""Placed stages without workers: the ``placement`` setting, the JSON the flow sends a
placed stage, the worker side (:func:`tasks.stages.placement.run_placed_here`) and the flow side
reading the result back (:func:`tasks.stages.placement.collect`) through the artifacts folder.
The same through real Prefect workers is ``test_placement_pools.py``."""

from __future__ import annotations

import json
import types
import uuid
from pathlib import Path

import pytest

from flows.config import build_config
from gpt.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("placement.pretrian=gpu", "placement names no stage 'pretrian'"),
        ("placement.download=gpu", "download runs in the flow's own process"),
        ("placement.judge=a b", "placement.judge: 'a b' is not a work pool name"),
        ('placement={"judge": 3}', "placement.judge"),
    ],
)
def test_placement_setting_is_checked(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config("smoke", [override])
    assert fragment in str(err.value), str(err.value)


def test_placement_setting_is_not_in_any_key():
    cfg = build_config("smoke", ["placement.pretrain=gpu", "placement.judge=judge"])
    assert cfg.placement == {"pretrain": "gpu", "judge": "judge"}
    plain = build_config("smoke")
    assert plain.placement == {}
    for stage in ("pretrain", "judge"):
        assert getattr(cfg, stage).key_dict() == getattr(plain, stage).key_dict()


@pytest.fixture
def upstream(mirror, tmp_path):
    """A run context and real download + tokenize results (smoke settings)."""
    from gpt.data.download import DownloadArgs
    from tasks.catalog import Catalog
    from tasks.stages.contract import RunContext
    from tasks.stages.runner import run_stage

    cfg = build_config("smoke")
    ctx = RunContext(
        run_id="parent-run",
        catalog_settings=Catalog().settings,
        artifacts=str(tmp_path / "artifacts"),
        datasets=str(tmp_path / "datasets"),
        mirror=str(mirror),
        progress=False,
        force=("judge",),
        download=DownloadArgs(retries=1),
    )
    ctx.recorder.start_run(ctx.run_id, flow_run_id=None, profile="smoke", config={}, git_rev=None)
    dl = run_stage(ctx, "download", cfg.download)
    tok = run_stage(ctx, "tokenize", cfg.tokenize, download=dl)
    return cfg, ctx, dl, tok


def _placed(ctx, flow_run_id: str):
    """``ctx`` as the placed stage's flow run gets it: through the JSON Prefect sends."""
    from gpt.distributed.codec import decode, encode

    wire = json.loads(json.dumps(encode(ctx, "run context")))
    return decode(wire, "run context").placed_on(flow_run_id)


def _flow_run(flow_run_id: str, pool: str = "gpu", worker: str = "gpu-worker-1"):
    """What ``run_deployment`` returns, as far as :func:`collect` reads it."""
    return types.SimpleNamespace(
        id=flow_run_id,
        work_pool_name=pool,
        labels={"prefect.worker.name": worker},
        state=types.SimpleNamespace(name="Completed", message=""),
    )


def test_the_json_sent_to_a_worker_keeps_context_inputs_and_key(upstream):
    from flows.stage_flow import settings_type
    from gpt.distributed.codec import decode, encode
    from gpt.errors import ConfigError
    from tasks.stages.runner import key_for, load_spec

    cfg, ctx, dl, tok = upstream
    wire = json.loads(json.dumps(encode(ctx, "run context")))  # what Prefect stores and sends
    assert decode(wire, "run context") == ctx
    inputs = {"tokenize": tok, "download": dl}
    back = decode(json.loads(json.dumps(encode(inputs, "inputs"))), "inputs")
    assert back["tokenize"].out == tok.out and back["download"].out == dl.out
    assert back["tokenize"].path("x") == tok.path("x")
    args = settings_type("baseline_spam").model_validate(
        json.loads(json.dumps(cfg.baseline_spam.to_dict()))
    )
    spec = load_spec("baseline_spam")
    assert key_for(spec, args, {"tokenize": back["tokenize"]}) == key_for(
        spec, cfg.baseline_spam, {"tokenize": tok}
    )
    with pytest.raises(ConfigError, match="run context fields \\['shard'\\] are unknown"):
        decode({**wire, "fields": {**wire["fields"], "shard": 3}}, "run context")


def test_placed_stage_runs_on_the_worker_and_is_read_back(upstream):
    from tasks.catalog import Catalog
    from tasks.records.runs import placed_records_dir
    from tasks.stages.placement import REPORT, collect, run_placed_here
    from tasks.stages.runner import key_for, load_spec, run_stage

    cfg, ctx, _, tok = upstream
    spec = load_spec("baseline_spam")
    key = key_for(spec, cfg.baseline_spam, {"tokenize": tok})
    child = str(uuid.uuid4())
    report = run_placed_here(
        _placed(ctx, child), "baseline_spam", cfg.baseline_spam, {"tokenize": tok}, key=key, code=""
    )
    assert report["outcome"] == "done" and report["committed"] and report["key"] == key
    assert (
        json.loads((Path(placed_records_dir(ctx.artifacts, child)) / REPORT).read_text()) == report
    )
    # the worker wrote its stage row to the catalog and to its own record, not the run's
    assert "baseline_spam" not in (ctx.recorder.read(ctx.run_id) or {})["stages"]
    assert report["row"]["status"] == "completed"

    result = collect(ctx, "baseline_spam", key, _flow_run(child, worker="w7"))
    assert result.key == key and not result.cache_hit
    assert result.root == str(ctx.store.final_dir("baseline_spam", key))
    # the run's record and the catalog hold the worker's row and where it ran
    rec_row = ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]
    outputs = json.loads(rec_row["outputs"])
    assert rec_row["status"] == "completed" and rec_row["started_at"] == report["row"]["started_at"]
    assert outputs["pool"] == "gpu" and outputs["worker"] == "w7"
    assert outputs["flow_run_id"] == child and outputs["host"] == report["host"]
    assert outputs["key"] == key and outputs["digest"] == result.digest
    row = Catalog().query_df(
        "SELECT status, outputs FROM stages WHERE run_id=? AND stage='baseline_spam'",
        [ctx.run_id],
    )
    assert row.status[0] == "completed" and json.loads(row.outputs[0]) == outputs
    # in-process, the same settings and inputs give the same key: a cache hit, same result
    local = run_stage(ctx, "baseline_spam", cfg.baseline_spam, tokenize=tok)
    assert local.cache_hit and local.digest == result.digest and local.out == result.out


def test_a_worker_with_other_code_is_refused(upstream):
    from tasks.records.runs import placed_records_dir
    from tasks.stages.placement import PlacementError, collect, run_placed_here
    from tasks.stages.runner import key_for, load_spec

    cfg, ctx, _, tok = upstream
    spec = load_spec("baseline_spam")
    key = key_for(spec, cfg.baseline_spam, {"tokenize": tok})
    flow_key, flow_code = "0" * 24, "f" * 64  # what a flow with other code computed
    child = str(uuid.uuid4())
    with pytest.raises(PlacementError) as err:
        run_placed_here(
            _placed(ctx, child),
            "baseline_spam",
            cfg.baseline_spam,
            {"tokenize": tok},
            key=flow_key,
            code=flow_code,
        )
    msg = str(err.value)
    assert f"computes key {key}, the flow computed {flow_key}" in msg
    assert "the code differs" in msg and "same gptflow commit" in msg
    # nothing was computed
    assert not ctx.store.final_dir("baseline_spam", key).exists()
    assert not ctx.store.final_dir("baseline_spam", flow_key).exists()
    # the flow refuses too, and records why
    with pytest.raises(PlacementError, match="computes key"):
        collect(ctx, "baseline_spam", flow_key, _flow_run(child))
    row = ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]
    assert row["status"] == "failed" and "computes key" in row["message"]

    # a report of a finished stage under another key (an older worker) is refused as well
    good = str(uuid.uuid4())
    run_placed_here(
        _placed(ctx, good), "baseline_spam", cfg.baseline_spam, {"tokenize": tok}, key=key, code=""
    )
    with pytest.raises(PlacementError, match=f"the worker computed key {key}"):
        collect(ctx, "baseline_spam", flow_key, _flow_run(good))
    assert Path(placed_records_dir(ctx.artifacts, good)).is_dir()


def test_a_placed_run_that_left_no_report_is_retryable(upstream):
    from tasks.stages.placement import PlacedStageCrashed, collect

    _, ctx, _, _ = upstream
    with pytest.raises(PlacedStageCrashed, match="without a report"):
        collect(ctx, "baseline_spam", "k" * 24, _flow_run(str(uuid.uuid4())))
    row = ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]
    assert row["status"] == "failed" and json.loads(row["outputs"])["pool"] == "gpu"


def _report(ctx, child: str, **fields) -> None:
    from tasks.records.runs import placed_records_dir
    from tasks.stages.placement import REPORT

    folder = Path(placed_records_dir(ctx.artifacts, child))
    folder.mkdir(parents=True)
    (folder / REPORT).write_text(json.dumps({"stage": "baseline_spam", **fields}))


def test_a_stage_skipped_or_incomplete_on_the_worker_comes_back_as_such(upstream):
    """A skip (e.g. the judge without Ollama) is a skip in the flow; an incomplete result
    (not committed, so a rerun continues it) comes back from the report, not the store."""
    from gpt.distributed.codec import encode
    from tasks.stages.contract import StageSkipped
    from tasks.stages.placement import collect

    _, ctx, _, tok = upstream
    skipped = str(uuid.uuid4())
    row = {"status": "skipped", "started_at": "2026-01-01 00:00:00", "outputs": None}
    _report(ctx, skipped, key="k" * 24, outcome="skipped", message="no judge", row=row)
    with pytest.raises(StageSkipped, match="no judge"):
        collect(ctx, "baseline_spam", "k" * 24, _flow_run(skipped))
    assert ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]["status"] == "skipped"

    partial = str(uuid.uuid4())
    row = {"status": "completed", "outputs": '{"key": "kk"}', "message": "2 requests failed"}
    _report(
        ctx,
        partial,
        key="k" * 24,
        outcome="done",
        committed=False,
        result=encode(tok, "result"),  # any typed result: the report's is used as is
        row=row,
    )
    got = collect(ctx, "baseline_spam", "k" * 24, _flow_run(partial))
    assert got.out == tok.out and got.digest == tok.digest
    rec = ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]
    assert rec["status"] == "completed" and rec["message"] == "2 requests failed"
    assert json.loads(rec["outputs"])["flow_run_id"] == partial


@pytest.mark.slow
def test_a_placed_stage_round_trips_through_an_object_store(
    s3_server, mirror, tmp_path, monkeypatch
):
    """Artifacts on S3 (the several-machines case): the worker's report and its stage
    row travel through the object store, and the flow side reads the committed result
    back into its own local cache."""
    from gpt.data.download import DownloadArgs
    from tasks.catalog import Catalog
    from tasks.stages.contract import RunContext
    from tasks.stages.placement import collect, run_placed_here
    from tasks.stages.runner import key_for, load_spec, run_stage

    for name, value in (
        ("ENDPOINT", s3_server.endpoint),
        ("KEY_ID", s3_server.key_id),
        ("SECRET", s3_server.secret),
        ("REGION", "us-east-1"),
    ):
        monkeypatch.setenv(f"GPTFLOW_ARTIFACTS_S3_{name}", value)
    root = f"s3://{s3_server.bucket}/placed-{uuid.uuid4().hex[:8]}"
    cfg = build_config("smoke")
    ctx = RunContext(
        run_id="parent-s3",
        catalog_settings=Catalog().settings,
        artifacts=root,
        datasets=str(tmp_path / "datasets"),
        mirror=str(mirror),
        progress=False,
        download=DownloadArgs(retries=1),
    )
    ctx.recorder.start_run(ctx.run_id, flow_run_id=None, profile="smoke", config={}, git_rev=None)
    tok = run_stage(
        ctx, "tokenize", cfg.tokenize, download=run_stage(ctx, "download", cfg.download)
    )
    key = key_for(load_spec("baseline_spam"), cfg.baseline_spam, {"tokenize": tok})
    child = str(uuid.uuid4())
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "worker-cache"))  # another machine
    report = run_placed_here(
        _placed(ctx, child), "baseline_spam", cfg.baseline_spam, {"tokenize": tok}, key=key, code=""
    )
    assert report["outcome"] == "done" and report["committed"]
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "flow-cache"))  # back on the flow's
    result = collect(ctx, "baseline_spam", key, _flow_run(child, worker="gpu-box"))
    assert result.key == key and Path(result.root).is_dir()
    assert str(tmp_path / "flow-cache") in result.root  # a verified local copy
    outputs = json.loads(ctx.recorder.read(ctx.run_id)["stages"]["baseline_spam"]["outputs"])
    assert outputs["worker"] == "gpu-box" and outputs["digest"] == result.digest
