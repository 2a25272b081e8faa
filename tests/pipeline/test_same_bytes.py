"""Same result, same bytes: every file a stage writes depends only on what it computed.

Two computations of one key — in two artifacts folders, or one killed with SIGKILL and
resumed — write byte-identical checkpoints (weights, optimizer state, metadata), token
files, exports, result JSON and stage manifests; only the records of who ran what and
when (``produced.json``, ``rows/``, a checkpoint's ``record.json``, the runner's
dot-files) differ. So content digests, and every key built on them, stay the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _paths import REPO

from gpt.architecture import GPTConfig
from gpt.checkpoint import RECORD, load_checkpoint, save_checkpoint
from gpt.model import GPT
from tasks.store.manifest import MANIFEST, PRODUCED, merge_manifest, split_manifest

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _is_record(rel: str) -> bool:
    """Files that record who ran what and when (allowed to differ)."""
    parts = rel.split("/")
    return (
        any(part.startswith(".") for part in parts)
        or (len(parts) > 2 and parts[2] == "rows")  # <stage>/<key>/rows/...
        or parts[-1] in (PRODUCED, RECORD)
    )


def _contents(root: Path) -> dict[str, str]:
    """{path under root: sha256} of every file that is not a record."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not _is_record(rel):
            out[rel] = _sha(p)
    return out


def _trained() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    return model, opt


def test_a_checkpoint_saved_again_has_the_same_bytes(tmp_path: Path) -> None:
    """The safetensors writer orders header metadata by a per-call hash: before the
    header was made canonical, saving one model twice gave one of two files (the "two
    weight sets" a retrain could land on). Twelve saves, one set of bytes; the times of
    the record stay outside the manifest."""
    model, opt = _trained()
    state = {"step": 3, "rng": torch.get_rng_state(), "metrics": [{"step": 1, "value": 0.5}]}
    seen: dict[str, set[str]] = {}
    for i in range(12):
        folder = save_checkpoint(
            tmp_path / f"c{i}",
            model,
            hparams={"lr": 1e-3},
            optimizer=opt,
            extra_state=state,
            meta={"stage": "test", "b": 1, "a": 2},
            record={"train_seconds": float(i)},  # differs on purpose
        )
        for rel, sha in _contents(folder).items():
            seen.setdefault(rel, set()).add(sha)
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", MANIFEST} <= set(seen)
    assert "trainer_tensors.safetensors" in seen
    assert {rel: len(s) for rel, s in seen.items() if len(s) > 1} == {}
    header = (tmp_path / "c0" / "model.safetensors").read_bytes()[8:200]
    assert b'"__metadata__":{"format":"pt","tied":"true"}' in header
    ck = load_checkpoint(tmp_path / "c3")
    assert ck.record == {"train_seconds": 3.0}  # read back, but not in the manifest
    assert RECORD not in json.loads((tmp_path / "c3" / MANIFEST).read_text())["files"]


def test_an_export_from_two_folders_has_the_same_bytes(tmp_path: Path, tokenizer_dir: Path) -> None:
    """An export named its source checkpoint by path: the same model exported from two
    artifacts folders gave two different config.json files."""
    from gpt.weights.hf_export import export_hf

    model, _ = _trained()
    gpt2_cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2)
    torch.manual_seed(1)
    model = GPT(gpt2_cfg)
    trees = []
    for name in ("one", "two"):
        ck = save_checkpoint(tmp_path / name / "ckpt", model, tokenizer_dir=tokenizer_dir)
        out = tmp_path / name / "export"
        export_hf(ck, out)
        trees.append(_contents(out))
    assert trees[0] == trees[1] and "config.json" in trees[0]
    config = json.loads((tmp_path / "one" / "export" / "config.json").read_text())
    assert config["gptflow_source"].startswith("sha256:")


def test_the_stage_manifest_keeps_records_in_their_own_file() -> None:
    """manifest.json holds what the result is; produced.json who made it, when and how
    fast; the two merge back into the manifest every reader sees."""
    full = {
        "version": 3,
        "stage": "pretrain",
        "key": "k",
        "code": "c",
        "args": {"epochs": 2},
        "run_args": {"epochs": 2, "checkpoint_every": 5},
        "inputs": {"tokenize": {"key": "t", "digest": "d", "run_id": "r1"}, "pretrain": None},
        "out": {"checkpoint": "final"},
        "measured": {"tokens_per_s": 12.5},
        "files": {
            "final/model.safetensors": {"bytes": 4, "sha256": "s", "mtime_ns": 7, "etag": "e"},
            "rows/metrics.parquet": {"bytes": 3, "sha256": "p", "mtime_ns": 8},
        },
        "digest": "g",
        "producer_run_id": "r2",
        "resumed_by_run_id": "r3",
        "created_at": 1.5,
        "wall_s": 2.0,
        "device": "cpu",
        "rows": {"metrics": {"n": 1, "scopes": [{"run_id": "r2"}]}},
    }
    content, record = split_manifest(full)
    assert merge_manifest(content, record) == full
    text = json.dumps(content)
    for token in ("r1", "r2", "r3", "mtime_ns", "etag", "created_at", "wall_s", "rows/"):
        assert token not in text, token
    assert content["files"] == {"final/model.safetensors": {"bytes": 4, "sha256": "s"}}
    assert content["args"] == {"epochs": 2} and "measured" not in content


#: The smoke profile with half its pretraining text (5 steps an epoch, 10 in all) and an
#: evaluation — the metrics rows the kill waits for — every 2 steps: the kill inside
#: pretraining still lands in its second epoch, after a checkpoint, at a third of the
#: smoke profile's pretraining cost.
SHORTER = ["--set", "tokenize.text_chars=3000", "--set", "pretrain.eval_every=2"]


def _argv(root: Path, run_id: str, mirror: Path, *extra: str) -> list[str]:
    """``python tests/helpers_dag.py …`` for one run."""
    return [str(REPO / "tests" / "helpers_dag.py"), str(root), run_id, str(mirror), *SHORTER,
            *extra]  # fmt: skip


@pytest.mark.slow
def test_every_stage_writes_the_same_bytes_twice_and_after_a_kill(
    tmp_path: Path, mirror: Path
) -> None:
    """The smoke stages (tokenize to extract_responses) in two artifacts folders, and in
    a third killed with SIGKILL inside pretrain and again inside finetune_instruct (more
    checkpoints there: an operational setting, not in the key), then resumed: the same
    keys and digests, and every result file with the same sha256. Each run is a process
    of its own, forked by one fork server (``helpers_fork``) that imported torch (and
    torch._dynamo, which the optimizers import), NumPy, pandas, tiktoken, scikit-learn
    and Prefect once."""
    import os

    from helpers_fork import SHARED, ForkServer

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    killed = tmp_path / "killed"
    often = [
        "--set",
        "pretrain.checkpoint_every=2",
        "--set",
        "finetune_instruct.checkpoint_every=1",
    ]
    dags = ForkServer(env, tmp_path / "logs", preload=SHARED)
    try:
        dags.start("one", _argv(tmp_path / "one", "one", mirror))
        dags.start("two", _argv(tmp_path / "two", "two", mirror))
        dags.start("k1", _argv(killed, "k1", mirror, "--kill", "pretrain:8", *often))
        rc, _, err = dags.finish("k1", timeout=540)
        assert rc == -9, err[-3000:]
        partial = list((killed / "artifacts" / "stages" / "pretrain").glob("*.partial/last"))
        assert partial, "the kill left no resumable pretrain checkpoint"
        dags.start("k2", _argv(killed, "k2", mirror, "--kill", "finetune_instruct:3", *often))
        rc, _, err = dags.finish("k2", timeout=540)
        assert rc == -9, err[-3000:]
        assert list(
            (killed / "artifacts" / "stages" / "finetune_instruct").glob(
                "*.partial/instruct/train/last"
            )
        )
        results = [dags.finish(name, timeout=540) for name in ("one", "two")]
        dags.start("k3", _argv(killed, "k3", mirror, *often))
        results.append(dags.finish("k3", timeout=540))
    finally:
        dags.close()
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    summaries = [json.loads(out.splitlines()[-1]) for _, out, _ in results]
    # the smoke profile's own settings make no stage warn (it used to warn "max_length 87
    # exceeds the context length 64" on every run)
    assert summaries[0].pop("warnings") == [] and summaries[1].pop("warnings") == []
    summaries[2].pop("warnings")

    # the resumed stages did resume, under the run that started them
    k = summaries[2]
    # killed at the evaluation of step 9, in epoch 2: resumed from the checkpoint of step 8
    assert k["pretrain"]["producer"] == "k1" and k["pretrain"]["out"]["resumed_from_step"] == 8
    assert k["finetune_instruct"]["producer"] == "k2"
    assert k["finetune_instruct"]["out"]["resumed_from_step"] == 2
    trees = [_contents(r / "artifacts" / "stages") for r in (tmp_path / "one", tmp_path / "two")]
    trees.append(_contents(killed / "artifacts" / "stages"))
    stages = {rel.split("/")[0] for rel in trees[0]}
    assert stages >= {"tokenize", "pretrain", "load_gpt2", "finetune_spam", "baseline_spam"}
    assert stages >= {"finetune_instruct", "extract_responses"}
    for tree in trees[1:]:
        differ = sorted(
            rel for rel in set(tree) | set(trees[0]) if tree.get(rel) != trees[0].get(rel)
        )
        assert differ == []
    for s in summaries[1:]:
        assert {n: (v["key"], v["digest"]) for n, v in s.items()} == {
            n: (v["key"], v["digest"]) for n, v in summaries[0].items()
        }
    # what may differ is there, in files of its own
    stages = killed / "artifacts" / "stages"
    for stage, resumer in (("pretrain", "k2"), ("finetune_instruct", "k3")):
        record = json.loads((stages / stage / k[stage]["key"] / PRODUCED).read_text())
        assert record["resumed_by_run_id"] == resumer
