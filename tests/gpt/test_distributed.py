"""Distributed training on the CPU with gloo: the settings, the launcher, and that
2 processes (DDP, and FSDP for the language model) train like 1 process with the same
global batch — per-step losses within 1e-5 and final weights within 1e-5 — for
pretraining, the spam finetune and the instruction finetune; and that a 2-process run
SIGKILLed after a checkpoint resumes and ends equal to an uninterrupted one.

Dropout is off everywhere (its masks depend on the process layout). Every torchrun
launch costs ~5-7 CPU-s before it trains (the agent and every rank importing torch), so
the training runs are shared by a module fixture, and the three DDP trainings (pretrain,
spam, instruct) run one after another in ONE 2-process launch
(``helpers_dist.in_turn``); FSDP pretraining has a launch of its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt.architecture import get_config
from gpt.args import ModelSpec, PretrainArgs
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.distributed import launch_command, run_distributed
from gpt.distributed.codec import decode, encode
from gpt.errors import ConfigError, DistributedError
from gpt.layout import DistributedArgs
from gpt.model import GPT
from gpt.recipes.pretrain import PretrainResult

TOL = 1e-5
TESTS = Path(__file__).resolve().parent

# the-verdict's first 2,400 characters: 8 steps of 4 windows of 16 tokens per epoch
LM_ARGS = PretrainArgs(
    model=ModelSpec(name="tiny", overrides={"context_length": 16, "drop_rate": 0.0}),
    batch_size=4,
    epochs=2,
    lr=1e-3,  # AdamW turns float-rounding gradient differences into ~lr-sized steps
    eval_every=3,
    eval_batches=2,
    checkpoint_every=6,  # steps 6 and 12: the one the killed run resumes from, and one before
    grad_clip=1.0,
    log_every=1,
    sample_tokens=4,
    plot=False,
)
STEPS = 16
KILL_AT = 13  # one step after the checkpoint at step 12 (position 4 of epoch 2)


# --------------------------------------------------------------------------- helpers


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder).model.state_dict()


def _max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _by_key(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[tuple, float]:
    """{(step, split, name): value}; a key sent twice (a resumed run) keeps the last."""
    return {(r["step"], r["split"], r["name"]): r["value"] for r in rows if r["name"] in names}


def _assert_close_rows(got: dict[tuple, float], ref: dict[tuple, float]) -> None:
    assert got.keys() == ref.keys()
    diff = max(abs(got[k] - ref[k]) for k in ref)
    assert diff <= TOL, f"max loss difference {diff}"


def _lm_kwargs(tokens: tuple[Path, Path], tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    return {
        "train_tokens": tokens[0],
        "val_tokens": tokens[1],
        "tokenizer_dir": tokenizer_dir,
        "out_dir": out,
        "args": LM_ARGS,
        "max_length": 16,
        "stride": 16,
        "device": "cpu",
        "progress": False,
    }


@pytest.fixture(scope="module")
def lm_tokens(tmp_path_factory: pytest.TempPathFactory, mirror: Path, tokenizer_dir: Path):
    from gpt.data.windows import tokenize_to_npy
    from gpt.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tokens")
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")[:2400]
    tok = Tokenizer.from_dir(tokenizer_dir)
    cut = int(0.9 * len(text))
    train = tokenize_to_npy(text[:cut], tok, folder / "train.npy").path
    val = tokenize_to_npy(text[cut:], tok, folder / "val.npy").path
    return train, val


def _with_tests_on_pythonpath(mp: pytest.MonkeyPatch) -> None:
    """Let torchrun's ranks import ``helpers_dist`` (they inherit this environment)."""
    mp.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    )


def _tiny_base(path: Path, tokenizer_dir: Path, **overrides: Any) -> Path:
    torch.manual_seed(7)
    cfg = get_config("tiny", drop_rate=0.0, context_length=64, **overrides)
    return save_checkpoint(path, GPT(cfg), tokenizer_dir=tokenizer_dir)


def _jobs(
    root: Path, lm_tokens: tuple[Path, Path], mirror: Path, tokenizer_dir: Path
) -> dict[str, tuple[str, dict[str, Any], tuple[str, ...]]]:
    """The trainings each layout runs: ``{job: (target, kwargs without out_dir, the
    callbacks it gets)}``."""
    from gpt.args import InstructArgs, SpamArgs
    from gpt.data.parsing import balance_and_split_spam, parse_sms

    parts = balance_and_split_spam(parse_sms(mirror / "sms+spam+collection.zip"), seed=123)
    sizes = {"train": 43, "val": 9, "test": 11}  # odd sizes: uneven shards
    splits = {
        k: ([r.text for r in parts[k][:n]], [int(r.label == "spam") for r in parts[k][:n]])
        for k, n in sizes.items()
    }
    # 43 messages in batches of 8, last one kept: 6 steps per epoch, the last of 3 rows
    spam_args = SpamArgs(epochs=2, lr=1e-3, batch_size=8, drop_last=False, max_length=24)
    records = json.loads((mirror / "instruction-data.json").read_text(encoding="utf-8"))
    # 11 records in batches of 4, last kept: 3 steps per epoch, the last of 3 sequences;
    # sequences of different lengths, padded per global batch, -100 targets ignored
    instruct_args = InstructArgs(
        epochs=2, batch_size=4, lr=2e-3, drop_last=False, eval_every=2, eval_batches=2,
        sample_tokens=4, log_every=1, checkpoint_every=2,
    )  # fmt: skip
    spam = {"base_checkpoint_dir": _tiny_base(root / "spam-base", tokenizer_dir, n_layers=3),
            "splits": splits, "args": spam_args, "device": "cpu", "progress": False}  # fmt: skip
    instruct = {"base_checkpoint_dir": _tiny_base(root / "instruct-base", tokenizer_dir),
                "train_records": records[:11], "val_records": records[11:14],
                "args": instruct_args, "device": "cpu", "progress": False}  # fmt: skip
    lm = _lm_kwargs(lm_tokens, tokenizer_dir, root)
    del lm["out_dir"]
    return {
        "pretrain": ("gpt.recipes.pretrain:pretrain", lm, ("on_metrics", "on_sample")),
        "spam": ("gpt.recipes.classifier:finetune_classifier", spam, ("on_metrics",)),
        "instruct": ("gpt.recipes.instruct:finetune_instruct", instruct, ("on_metrics",)),
    }


def _sinks(names: tuple[str, ...], rows: list, samples: list) -> dict[str, Any]:
    sink = {"on_metrics": rows.extend, "on_sample": samples.append}
    return {name: sink[name] for name in names}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, lm_tokens, mirror: Path, tokenizer_dir: Path):
    """Every training of this file per layout: ``{layout: {job: (result, metric rows,
    samples, out_dir)}}``. ``single``: each job in this process; ``ddp``: pretrain, the
    spam and the instruction finetune one after another in one 2-process launch, each
    with its own callbacks; ``fsdp``: pretrain on 2 processes."""
    root = tmp_path_factory.mktemp("runs")
    jobs = _jobs(root / "inputs", lm_tokens, mirror, tokenizer_dir)
    runs: dict[str, dict[str, tuple]] = {"single": {}, "ddp": {}, "fsdp": {}}
    for job, (target, kwargs, names) in jobs.items():
        rows: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        out = root / "single" / job
        res = run_distributed(
            target,
            {**kwargs, "out_dir": out},
            DistributedArgs(),
            workdir=root / "single-work",
            callbacks=_sinks(names, rows, samples),
        )
        runs["single"][job] = (res, rows, samples, out)

    sinks = {job: ([], []) for job in jobs}
    callbacks = {
        f"{job}__{name}": fn
        for job, (_, _, names) in jobs.items()
        for name, fn in _sinks(names, *sinks[job]).items()
    }
    with pytest.MonkeyPatch.context() as mp:
        _with_tests_on_pythonpath(mp)
        results = run_distributed(
            "helpers_dist:in_turn",
            {"jobs": {job: [target, {**kwargs, "out_dir": root / "ddp" / job}]
                      for job, (target, kwargs, _) in jobs.items()}},
            DistributedArgs(nproc=2),
            workdir=root / "ddp-work",
            callbacks=callbacks,
            timeout_s=600,
        )  # fmt: skip
    assert sorted(results) == sorted(jobs)
    for job in jobs:
        runs["ddp"][job] = (results[job], *sinks[job], root / "ddp" / job)

    rows, samples = [], []
    out = root / "fsdp" / "pretrain"
    target, kwargs, names = jobs["pretrain"]
    res = run_distributed(
        target,
        {**kwargs, "out_dir": out},
        DistributedArgs(nproc=2, strategy="fsdp"),
        workdir=root / "fsdp-work",
        callbacks=_sinks(names, rows, samples),
        timeout_s=300,
    )
    runs["fsdp"]["pretrain"] = (res, rows, samples, out)
    return runs


# --------------------------------------------------------------------------- settings


def test_settings_validate_the_layout() -> None:
    assert DistributedArgs().world_size == 1 and not DistributedArgs().is_distributed
    assert DistributedArgs(nproc=2, nnodes=3, rdzv_endpoint="10.0.0.5:29400").world_size == 6
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        DistributedArgs(nnodes=2)
    with pytest.raises(ConfigError, match="host:port"):
        DistributedArgs(rdzv_endpoint="10.0.0.5")
    with pytest.raises(ConfigError, match="node_rank: 2 must be below nnodes 2"):
        DistributedArgs(nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    with pytest.raises(ConfigError, match="strategy"):
        DistributedArgs(strategy="zero3")
    with pytest.raises(ConfigError, match="nproc"):
        DistributedArgs(nproc=0)


def test_launch_command_per_layout(tmp_path: Path) -> None:
    def flags(**kw: Any) -> list[str]:
        cmd = launch_command(DistributedArgs(**kw), tmp_path)
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert cmd[-3:] == ["-m", "gpt.distributed.worker", str(tmp_path)]
        return cmd[3:-3]

    assert flags(nproc=2) == [
        "--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0",
    ]  # fmt: skip
    assert flags(nproc=4, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job7") == [
        "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7", "--max-restarts", "0",
    ]  # fmt: skip
    assert flags(nproc=1, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29500") == [
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "1",
        "--master-addr", "10.0.0.5", "--master-port", "29500", "--max-restarts", "0",
    ]  # fmt: skip


def test_codec_round_trips_paths_settings_and_dataclasses(tmp_path: Path) -> None:
    res = PretrainResult(
        out_dir=tmp_path, final_dir=tmp_path / "final", last_dir=None, loss_png=None,
        train_tokens=1, val_tokens=2, train_windows=3, val_windows=4, steps=5, epochs=1,
        tokens_seen=6, tokens_per_s=float("nan"), train_seconds=0.5, wall_seconds=1.0,
        final_train_loss=2.0, final_val_loss=3.0, resumed_from_step=None, parameters=7,
        device="cpu", config={"a": 1}, samples=[{"text": "x"}], metrics=[{"step": 1}],
    )  # fmt: skip
    value = {"args": LM_ARGS, "path": tmp_path, "pair": (["a"], [1]), "result": res}
    back = decode(json.loads(json.dumps(encode(value))))
    assert back["args"] == LM_ARGS and isinstance(back["args"], PretrainArgs)
    assert back["path"] == tmp_path and isinstance(back["path"], Path)
    assert back["pair"] == (["a"], [1])
    got = back["result"]
    assert isinstance(got, PretrainResult) and got.final_dir == tmp_path / "final"
    assert got.metrics == [{"step": 1}] and got.tokens_per_s != got.tokens_per_s  # NaN kept
    with pytest.raises(ConfigError, match=r"kwargs\.model: a Tensor cannot be passed"):
        encode({"model": torch.zeros(1)}, "kwargs")


def test_one_process_runs_in_this_process(tmp_path: Path) -> None:
    """nproc = 1: no torchrun, the target gets the callbacks themselves (None ones are
    dropped) and its result as it is."""
    seen: list[Any] = []

    def default(obj: Any) -> str:
        seen.append(obj)
        return "<path>"

    out = run_distributed(
        "json:dumps",
        {"obj": {"p": tmp_path}},
        DistributedArgs(),
        workdir=tmp_path / "unused",
        callbacks={"default": default, "cls": None},
    )
    assert out == '{"p": "<path>"}' and seen == [tmp_path]
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ConfigError, match="both as kwargs and as callbacks"):
        run_distributed(
            "json:dumps", {"obj": 1, "default": str}, DistributedArgs(nproc=2),
            workdir=tmp_path, callbacks={"default": str},
        )  # fmt: skip


def test_event_channel_forwards_complete_lines_once(tmp_path: Path) -> None:
    """What rank 0's callbacks write is forwarded in order, once, and a line still being
    written waits for its newline."""
    from gpt.distributed.launch import _EventForwarder
    from gpt.distributed.worker import EventChannel

    events = tmp_path / "events.jsonl"
    got: list[tuple[str, Any]] = []
    fwd = _EventForwarder(
        events,
        {"on_metrics": lambda rows: got.append(("m", rows)), "on_sample": lambda s: got.append(("s", s))},
    )  # fmt: skip
    fwd.pump()  # no file yet
    EventChannel(events, "on_metrics")([{"step": 1, "value": float("nan")}])
    EventChannel(events, "on_sample")({"text": "hi", "path": tmp_path})
    with open(events, "a", encoding="utf-8") as f:
        f.write('{"callback": "on_metrics", "args": [[{"step": 2}]')  # no newline yet
    fwd.pump()
    assert [g[0] for g in got] == ["m", "s"] and got[1][1] == {"text": "hi", "path": tmp_path}
    assert got[0][1][0]["step"] == 1 and got[0][1][0]["value"] != got[0][1][0]["value"]
    with open(events, "a", encoding="utf-8") as f:
        f.write("]}\n")
    fwd.pump()
    fwd.pump()
    assert got[2] == ("m", [{"step": 2}]) and len(got) == 3


# --------------------------------------------------------------------------- pretrain


@pytest.mark.slow
def test_pretrain_two_processes_equal_one(runs) -> None:
    single, rows1, samples1, _ = runs["single"]["pretrain"]
    ddp, rows2, samples2, out2 = runs["ddp"]["pretrain"]
    assert isinstance(ddp, PretrainResult) and ddp.final_dir == (out2 / "final").resolve()
    assert single.steps == ddp.steps == STEPS and ddp.tokens_seen == single.tokens_seen
    step_losses = _by_key(rows1, ("step_loss",))
    assert len(step_losses) == STEPS
    _assert_close_rows(_by_key(rows2, ("step_loss",)), step_losses)
    _assert_close_rows(_by_key(rows2, ("loss",)), _by_key(rows1, ("loss",)))
    # the channel forwarded every row once, in order, with the in-process row layout
    assert [(r["step"], r["name"], r["split"]) for r in rows2] == [
        (r["step"], r["name"], r["split"]) for r in rows1
    ]
    assert ddp.metrics == rows2  # rank 0's result carries the same rows
    assert [s["text"] for s in samples2] == [s["text"] for s in samples1]
    assert _max_weight_diff(_weights(ddp.final_dir), _weights(single.final_dir)) <= TOL
    # rank 0 alone wrote: one final folder, no leftovers of a second writer
    assert sorted(p.name for p in out2.iterdir()) == ["final", "last"]


@pytest.mark.slow
def test_pretrain_fsdp_equals_one_process(runs) -> None:
    single, rows1, samples1, _ = runs["single"]["pretrain"]
    fsdp, rows2, samples2, _ = runs["fsdp"]["pretrain"]
    assert fsdp.steps == STEPS
    _assert_close_rows(_by_key(rows2, ("step_loss",)), _by_key(rows1, ("step_loss",)))
    _assert_close_rows(_by_key(rows2, ("loss",)), _by_key(rows1, ("loss",)))
    assert [s["text"] for s in samples2] == [s["text"] for s in samples1]
    assert _max_weight_diff(_weights(fsdp.final_dir), _weights(single.final_dir)) <= TOL
    # the resumable state has the single-process layout (positional optimizer state)
    from gpt.checkpoint import load_checkpoint as load

    ck = load(fsdp.final_dir.parent / "last", with_optimizer=True)
    ref = load(single.final_dir.parent / "last", with_optimizer=True)
    assert ck.optimizer_state["param_groups"][0]["params"] == list(
        range(len(ref.optimizer_state["state"]))
    )
    assert ck.optimizer_state["state"].keys() == ref.optimizer_state["state"].keys()


@pytest.mark.slow
def test_killed_two_process_run_resumes_equal(
    runs, lm_tokens, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of torchrun and both ranks one step after a checkpoint; the rerun
    continues from that checkpoint and ends bit for bit where an uninterrupted
    2-process run ends."""
    _with_tests_on_pythonpath(monkeypatch)
    ref, ref_rows, _, _ = runs["ddp"]["pretrain"]
    out, work = tmp_path / "out", tmp_path / "work"
    rows: list[dict[str, Any]] = []
    kwargs = _lm_kwargs(lm_tokens, tokenizer_dir, out)
    with pytest.raises(DistributedError, match="torchrun exit status -9") as info:
        run_distributed(
            "helpers_dist:pretrain_killed_at",
            {**kwargs, "kill_at": KILL_AT, "workdir": str(work)},
            DistributedArgs(nproc=2),
            workdir=work,
            callbacks={"on_metrics": rows.extend},
            timeout_s=300,
        )
    assert "torchrun.err" in str(info.value)
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["step"] == KILL_AT - 1 and state["position"] == 4 and state["world_size"] == 2
    assert len(state["rank_rng"]) == 2
    assert not (out / "final").exists()
    assert max(r["step"] for r in rows) == KILL_AT  # the rows sent before the kill arrived

    res = run_distributed(
        "gpt.recipes.pretrain:pretrain",
        kwargs,
        DistributedArgs(nproc=2),
        workdir=work,
        callbacks={"on_metrics": rows.extend},
        timeout_s=300,
    )
    assert res.resumed_from_step == KILL_AT - 1 and res.steps == ref.steps
    got, want = _weights(res.final_dir), _weights(ref.final_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)
    keys = ("step_loss", "loss")
    assert _by_key(rows, keys) == _by_key(ref_rows, keys)  # resent rows replace themselves


@pytest.mark.slow
def test_batch_that_does_not_split_is_a_config_error(
    lm_tokens, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rank's ConfigError comes back as a ConfigError (torchrun's failure as its
    cause); with ``echo`` the ranks' output reached this process's stderr."""
    kwargs = _lm_kwargs(lm_tokens, tokenizer_dir, tmp_path / "out")
    kwargs["args"] = LM_ARGS.replace(batch_size=3)
    with pytest.raises(ConfigError, match="batch_size=3 cannot be split evenly over 2") as info:
        run_distributed(
            "gpt.recipes.pretrain:pretrain",
            kwargs,
            DistributedArgs(nproc=2),
            workdir=tmp_path / "work",
            timeout_s=300,
            echo=True,
        )
    assert isinstance(info.value.__cause__, DistributedError)
    assert "gpt.errors.ConfigError: batch_size=3" in capsys.readouterr().err
    assert not (tmp_path / "out" / "last").exists()


@pytest.mark.slow
def test_two_nodes_meet_at_the_rendezvous_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nnodes = 2 on this machine (two launches, one process each) through a c10d
    rendezvous at rdzv_endpoint, reached by a recipe that relaunches itself
    (:func:`~gpt.distributed.launch.relaunch`): the ranks exchange data; on the node
    that got global rank 0 the recipe returns rank 0's result, on the other
    run_distributed returns None, which relaunch reports as "ran on another machine";
    torchrun's files went beside each ``out_dir`` (never inside) and are removed after
    success."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    _with_tests_on_pythonpath(monkeypatch)
    monkeypatch.syspath_prepend(str(TESTS))
    import helpers_dist as hd

    from gpt.distributed.launch import scratch_dir

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = DistributedArgs(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="t")
    layout = hd.Layout(distributed=args)
    outs = [tmp_path / f"node{i}" / "k123.partial" for i in range(2)]

    def node(i: int) -> Any:
        outs[i].mkdir(parents=True)
        try:
            return hd.gather(layout, outs[i], {"node": "same spec"})
        except DistributedError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(node, range(2)))
    errors = [r for r in results if isinstance(r, DistributedError)]
    assert [r for r in results if r not in errors] == [[{"node": "same spec"}] * 2]
    assert len(errors) == 1 and "ran on another machine" in str(errors[0]), errors
    for out in outs:
        assert not scratch_dir(out).exists() and list(out.iterdir()) == []


# --------------------------------------------------------------------------- finetunes


@pytest.mark.slow
def test_spam_finetune_two_processes_equal_one(runs) -> None:
    r1, rows1, _, out1 = runs["single"]["spam"]
    r2, rows2, _, out2 = runs["ddp"]["spam"]
    assert r1["steps"] == r2["steps"] == 12
    diff = max(abs(a - b) for a, b in zip(r1["step_losses"], r2["step_losses"], strict=True))
    assert diff <= TOL, f"max step loss difference {diff}"
    _assert_close_rows(_by_key(rows2, ("loss",)), _by_key(rows1, ("loss",)))
    assert r1["final"] == r2["final"]  # predictions gathered from both ranks' shards
    assert _max_weight_diff(_weights(out2), _weights(out1)) <= TOL


@pytest.mark.slow
def test_instruct_finetune_two_processes_equal_one(runs) -> None:
    r1, rows1, _, out1 = runs["single"]["instruct"]
    r2, rows2, _, out2 = runs["ddp"]["instruct"]
    assert r1["steps"] == r2["steps"] == 6 and r1["tokens_seen"] == r2["tokens_seen"]
    _assert_close_rows(_by_key(rows2, ("step_loss",)), _by_key(rows1, ("step_loss",)))
    _assert_close_rows(_by_key(rows2, ("loss",)), _by_key(rows1, ("loss",)))
    assert [s["text"] for s in r2["samples"]] == [s["text"] for s in r1["samples"]]
    assert _max_weight_diff(_weights(out2), _weights(out1)) <= TOL


@pytest.mark.slow
def test_relaunched_recipe_runs_under_torchrun_and_keeps_scratch_only_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe that relaunches itself (:func:`~gpt.distributed.launch.relaunch`), called
    with a 2-process layout, runs under torchrun; torchrun's files go beside its
    ``out_dir`` (never inside it) and are kept after a failure (their removal after
    success, and rank 0's result coming back: the two-node test above); with one
    process it is a plain call with no scratch folder."""
    _with_tests_on_pythonpath(monkeypatch)
    monkeypatch.syspath_prepend(str(TESTS))
    import helpers_dist as hd

    from gpt.distributed.launch import scratch_dir

    out = tmp_path / "work" / "k123.partial"
    out.mkdir(parents=True)
    scratch = scratch_dir(out)
    assert scratch == out.parent / ".k123.partial.torchrun"
    two = hd.Layout(distributed=DistributedArgs(nproc=2, backend="gloo"))
    with pytest.raises(DistributedError, match="parse on 2 processes") as info:
        hd.parse(two, out, "{not json")
    assert "JSONDecodeError" in str(info.value)
    assert (scratch / "torchrun.err").is_file() and (scratch / "spec.json").is_file()
    assert list(out.iterdir()) == []  # nothing of torchrun's in the output folder
    scratch.rename(tmp_path / "kept")
    assert hd.parse(hd.Layout(), out, "[1]") == [1]
    assert not scratch.exists()
