"""Kill -9 during pretraining, then run again: training continues from the last
checkpoint (steps continue), the catalog's metric rows are not duplicated, and the final
weights equal those of an uninterrupted run, bit for bit.

Each run is a child process running the pretrain stage library (gpt.recipes.pretrain.pretrain)
with the pipeline's own metrics sink (tasks.stages.contract.StageRun.metrics_sink), on a tiny
model over the first 3,000 characters of the-verdict. The reference run and the run
that gets killed execute concurrently to save wall time. A kill inside the checkpoint
write itself is covered in-process by ``test_crash_between_checkpoint_renames_resumes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers_fork import TORCH, ForkServer

STEPS_PER_EPOCH = 21  # 676 training tokens -> 42 windows of 16 -> 21 batches of 2
EPOCHS = 2
CHECKPOINT_EVERY = 3
KILL_AT = 25  # an evaluation step (odd), one step after the checkpoint at step 24

_CHILD = r"""
import json, os, signal, sys
from pathlib import Path
out, db, text, tok, run_id, mode = sys.argv[1:7]
epochs, ckpt, kill = (int(x) for x in sys.argv[7:10])
from gpt.data.windows import tokenize_to_npy
from gpt.recipes.pretrain import pretrain
from gpt.args import ModelSpec, PretrainArgs
from gpt.tokenizer import Tokenizer
from tasks.catalog import CatalogSettings
from tasks.records.rows import RowSink
from tasks.stages.contract import RunContext, StageRun

args = PretrainArgs(
    model=ModelSpec(name="tiny"), batch_size=2, epochs=epochs, eval_every=2,
    eval_batches=1, checkpoint_every=ckpt, sample_tokens=4, plot=False, seed=123,
)
text_str = Path(text).read_text(encoding="utf-8")
cut = int(0.9 * len(text_str))
tokenizer = Tokenizer.from_dir(tok)
toks = Path(out).parent / (Path(out).name + "-tokens")
train = tokenize_to_npy(text_str[:cut], tokenizer, toks / "train.npy").path
val = tokenize_to_npy(text_str[cut:], tokenizer, toks / "val.npy").path
ctx = RunContext(run_id=run_id, catalog_settings=CatalogSettings(path=Path(db)), artifacts=str(Path(out).parent),
                 datasets=str(Path(out).parent), progress=False)
stage_run = StageRun(ctx=ctx, stage="pretrain", key="k", work=Path(out), final=Path(out),
                     producer=run_id, rows=RowSink(Path(out), ctx.catalog))
sink = stage_run.metrics_sink()

def on_metrics(rows):
    sink(rows)
    if mode == "metrics" and max(r["step"] for r in rows) >= kill:
        os.kill(os.getpid(), signal.SIGKILL)  # right after the rows reached the catalog

res = pretrain(train, val, tok, out, args, max_length=16, stride=16, device="cpu",
               on_metrics=on_metrics, progress=False)
print(json.dumps({"steps": res.steps, "resumed_from_step": res.resumed_from_step}))
"""


def _start(
    children: ForkServer,
    name: str,
    out: Path,
    db: Path,
    text: Path,
    tok: Path,
    run_id: str,
    mode: str,
) -> None:
    """The child ``name``: ``python -c _CHILD …``, forked by ``children``."""
    children.start(name, ["-c", _CHILD, str(out), str(db), str(text), str(tok), run_id, mode,
                          str(EPOCHS), str(CHECKPOINT_EVERY), str(KILL_AT)])  # fmt: skip


def _metrics(db: Path, run_id: str) -> pd.DataFrame:
    from tasks.catalog import Catalog

    return Catalog(db).query_df(
        "SELECT step, epoch, seen, split, name, value FROM metrics WHERE run_id = ? "
        "ORDER BY step, split, name",
        [run_id],
    )


@pytest.mark.slow
def test_kill_9_during_pretrain_resumes_exactly(
    tmp_path: Path, mirror: Path, tokenizer_dir: Path, sub_env: dict[str, str]
) -> None:
    from gpt.checkpoint import load_checkpoint
    from tasks.catalog import Catalog

    text = tmp_path / "text.txt"
    text.write_text(
        (mirror / "the-verdict.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8"
    )
    db = tmp_path / "catalog.duckdb"
    Catalog(db).migrate()
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with ForkServer(sub_env, tmp_path / "logs", preload=TORCH) as children:
        _start(children, "ref", ref, db, text, tokenizer_dir, "ref", "none")
        _start(children, "killed", killed, db, text, tokenizer_dir, "killed", "metrics")
        results = {k: children.finish(k, timeout=240) for k in ("ref", "killed")}
        rc, out, err = results["ref"]
        assert rc == 0, err
        assert json.loads(out.splitlines()[-1]) == {
            "steps": STEPS_PER_EPOCH * EPOCHS,
            "resumed_from_step": None,
        }
        assert results["killed"][0] == -9, results["killed"][2]
        # what the kill left: a resumable checkpoint at step 24, no final weights, and the
        # catalog rows of step 25 (written after that checkpoint)
        state = json.loads((killed / "last" / "trainer_state.json").read_text())
        assert state["step"] == KILL_AT - 1 and state["epoch"] == 1
        assert not (killed / "final").exists()
        assert _metrics(db, "killed")["step"].max() == KILL_AT

        # run it again: what `gptflow rerun pretrain` does with the kept work folder
        _start(children, "resumed", killed, db, text, tokenizer_dir, "killed", "none")
        rc, out, err = children.finish("resumed", timeout=240)
    assert rc == 0, err
    summary = json.loads(out.splitlines()[-1])
    # steps continue from the last checkpoint (not from scratch) up to the same end
    assert summary == {"steps": STEPS_PER_EPOCH * EPOCHS, "resumed_from_step": KILL_AT - 1}
    ref_w = load_checkpoint(ref / "final").model.state_dict()
    got = load_checkpoint(killed / "final").model.state_dict()
    assert got.keys() == ref_w.keys()
    assert all(torch.equal(got[k], ref_w[k]) for k in ref_w)
    m, ref_m = _metrics(db, "killed"), _metrics(db, "ref")
    dup = m[m.duplicated(["step", "split", "name"], keep=False)]
    assert dup.empty, f"metric rows duplicated after resume:\n{dup}"
    keys = ["step", "epoch", "seen", "split", "name"]
    pd.testing.assert_frame_equal(m[keys], ref_m[keys])  # same rows ...
    losses = m[m["name"] == "loss"].reset_index(drop=True)
    ref_losses = ref_m[ref_m["name"] == "loss"].reset_index(drop=True)
    pd.testing.assert_frame_equal(losses, ref_losses, check_exact=True)  # ... same losses
    # the rows the stage folder will hold: the interrupted attempt's and the resumed
    # one's, each (step, split, name) once, equal to the uninterrupted run's
    from tasks.records.rows import RowSink

    folder_rows = pd.DataFrame(RowSink(killed).rows()["metrics"])
    ref_rows = pd.DataFrame(RowSink(ref).rows()["metrics"])
    assert not folder_rows.duplicated(["step", "split", "name"]).any()
    order = ["step", "split", "name"]
    folder_rows = folder_rows[folder_rows["name"] == "loss"]  # (tokens/s are timings)
    ref_rows = ref_rows[ref_rows["name"] == "loss"]
    pd.testing.assert_frame_equal(
        folder_rows.sort_values(order)[[*keys, "value"]].reset_index(drop=True),
        ref_rows.sort_values(order)[[*keys, "value"]].reset_index(drop=True),
    )


def _tiny_training(out: Path):
    """train_lm on a tiny model (vocabulary 1,000) and synthetic tokens (21 steps/epoch,
    2 epochs), on one thread."""
    from _rel_helpers import TINY

    from gpt.architecture import GPTConfig
    from gpt.args import LMTrainArgs
    from gpt.data.windows import SlidingWindowDataset, make_loader
    from gpt.model import GPT
    from gpt.train import train_lm

    tokens = torch.randint(0, 1000, (700,), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    model = GPT(GPTConfig(**{**TINY, "drop_rate": 0.1, "vocab_size": 1000}))
    train = make_loader(SlidingWindowDataset(tokens[:680], 16, 16), 2, True, True, seed=1)
    args = LMTrainArgs(
        epochs=2,
        eval_every=50,
        eval_batches=1,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_lm(model, train, None, args, out_dir=out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, res


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except Exception handler sees it)."""


def test_crash_between_checkpoint_renames_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_checkpoint replaces ``last`` by renaming it aside, then renaming the new folder
    in. A kill between the two renames leaves no ``last``: the rerun must still continue
    from the previous checkpoint (step 21), not silently start over from step 0."""
    import os

    import gpt.checkpoint

    ref_model, ref = _tiny_training(tmp_path / "ref")
    out = tmp_path / "crashed"
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        state = Path(str(src)) / "trainer_state.json"
        last_target = Path(str(dst)) == out / "last" and state.exists()
        if last_target and json.loads(state.read_text())["step"] >= KILL_AT - 1:
            raise _Killed
        real_rename(src, dst)

    monkeypatch.setattr(gpt.checkpoint.os, "rename", rename)
    with pytest.raises(_Killed):
        _tiny_training(out)
    monkeypatch.undo()
    assert not (out / "last").exists()  # the window this test is about
    model, res = _tiny_training(out)
    assert res.resumed_from_step == KILL_AT - 1 - CHECKPOINT_EVERY, res.resumed_from_step
    assert res.steps == ref.steps
    sa, sb = model.state_dict(), ref_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
