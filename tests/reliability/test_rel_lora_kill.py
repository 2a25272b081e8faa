"""Kill -9 during a LoRA instruction finetune, then run again: training continues from the
last (adapter-only) checkpoint, and the final adapter equals that of an uninterrupted
run, bit for bit — the resume of full finetunes (``test_rel_pretrain_kill``), with the
model's base weights coming from the base checkpoint on every load.

Each run is a child process running :func:`gpt.recipes.instruct.finetune_instruct` with
``lora`` set on a tiny base; the reference run and the run that gets killed execute
concurrently to save wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_fork import TORCH, ForkServer

KILL_AT = 5  # one step after the checkpoint at step 4 (checkpoint_every 2, 3 steps/epoch)
TOTAL = 6

_CHILD = r"""
import json, os, signal, sys
from pathlib import Path
base, out, data, mode, kill = sys.argv[1:6]
from gpt.recipes.instruct import finetune_instruct
from gpt.args import InstructArgs

records = json.loads(Path(data).read_text(encoding="utf-8"))[:16]
args = InstructArgs(
    lora={"rank": 4, "alpha": 8, "dropout": 0.1}, drop_rate=0.1, epochs=2, batch_size=4,
    lr=5e-3, eval_every=2, eval_batches=1, checkpoint_every=2, sample_tokens=2, max_length=64,
)

def on_metrics(rows):
    if mode == "kill" and max(r["step"] for r in rows) >= int(kill):
        os.kill(os.getpid(), signal.SIGKILL)

res = finetune_instruct(Path(base), records[:12], records[12:14], args, out_dir=Path(out),
                        device="cpu", on_metrics=on_metrics, progress=False)
print(json.dumps({"steps": res["steps"], "resumed_from_step": res["resumed_from_step"]}))
"""


def _start(children: ForkServer, name: str, base: Path, out: Path, data: Path, mode: str) -> None:
    """The child ``name``: ``python -c _CHILD …``, forked by ``children``."""
    children.start(name, ["-c", _CHILD, str(base), str(out), str(data), mode, str(KILL_AT)])


@pytest.mark.slow
def test_kill_9_during_lora_finetune_resumes_exactly(
    tmp_path: Path, mirror: Path, lm_checkpoint: Path, sub_env: dict[str, str]
) -> None:
    from safetensors.torch import load_file

    data = mirror / "instruction-data.json"
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with ForkServer(sub_env, tmp_path / "logs", preload=TORCH) as children:
        _start(children, "ref", lm_checkpoint, ref, data, "none")
        _start(children, "killed", lm_checkpoint, killed, data, "kill")
        results = {k: children.finish(k, timeout=240) for k in ("ref", "killed")}
        rc, out, err = results["ref"]
        assert rc == 0, err
        assert json.loads(out.splitlines()[-1]) == {"steps": TOTAL, "resumed_from_step": None}
        assert results["killed"][0] == -9, results["killed"][2]
        last = killed / "train" / "last"
        assert json.loads((last / "trainer_state.json").read_text())["step"] == KILL_AT - 1
        assert (last / "adapter.safetensors").exists()
        assert not (last / "model.safetensors").exists()

        _start(children, "again", lm_checkpoint, killed, data, "none")
        rc, out, err = children.finish("again", timeout=240)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1]) == {"steps": TOTAL, "resumed_from_step": KILL_AT - 1}
    want = load_file(str(ref / "adapter.safetensors"))
    got = load_file(str(killed / "adapter.safetensors"))
    assert got.keys() == want.keys() and want
    assert all(torch.equal(got[k], want[k]) for k in want)
