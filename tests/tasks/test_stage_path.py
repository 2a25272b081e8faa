"""One setting's path to the training loop: from the Prefect task of a stage to
:func:`gpt.train.train_lm`, a short chain of typed calls with the settings object the
config built (validated once, never rebuilt on the way).

The test runs the finetune_instruct stage through the function its Prefect task runs
(Prefect's own engine frames sit above it and are not counted) and looks at the stack
from inside the loop: a progress callback that ``train_lm`` calls itself walks the
frames back to the task's function. With a two-process layout the same call goes
through torchrun instead (slow: it starts one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

import pytest

#: Function boundaries allowed from the Prefect task to the loop, both counted
#: (task → run_stage → the stage body → its recipe → train_lm).
MOST_HOPS = 5


def _name(frame: FrameType) -> str:
    return f"{frame.f_globals.get('__name__')}:{frame.f_code.co_name}"


def _instruct_stage(tmp_path: Path, tokenizer_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The finetune_instruct stage's task function, a run context and the stage's inputs
    (a tiny base model, eight records)."""
    from gpt.architecture import get_config
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT
    from tasks.catalog import CatalogSettings
    from tasks.stages.contract import RunContext, StageOutput
    from tasks.stages.prefect_tasks import stage_task

    save_checkpoint(tmp_path / "base", GPT(get_config("tiny")), tokenizer_dir=tokenizer_dir)
    recs = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(8)]
    (tmp_path / "splits.json").write_text(json.dumps({"train": recs, "val": recs[:2]}))
    tokenize = StageOutput("tokenize", "k1", str(tmp_path), "r0", "d1",
                           out=SimpleNamespace(instruct_splits="splits.json"))  # fmt: skip
    load_gpt2 = StageOutput("load_gpt2", "k2", str(tmp_path), "r0", "d2",
                            out=SimpleNamespace(instruct_base="base"))  # fmt: skip
    ctx = RunContext(
        run_id="r1",
        catalog_settings=CatalogSettings(path=tmp_path / "catalog.duckdb"),
        artifacts=str(tmp_path / "artifacts"),
        datasets=str(tmp_path / "datasets"),
        device="cpu",
        progress=False,
    )
    return stage_task("finetune_instruct").fn, ctx, {"tokenize": tokenize, "load_gpt2": load_gpt2}


def test_max_steps_reaches_the_loop_in_five_calls_unchanged(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.train
    from gpt.args import InstructArgs
    from tasks.stages.contract import StageRun

    task_fn, ctx, inputs = _instruct_stage(tmp_path, tokenizer_dir)
    args = InstructArgs(epochs=1, batch_size=2, max_steps=1, eval_every=1, eval_batches=1,
                        sample_tokens=0)  # fmt: skip
    seen: dict[str, Any] = {}

    def look(done: int, total: int) -> None:
        frame = sys._getframe(1)
        path = []
        while frame is not None and frame.f_code is not task_fn.__code__:
            path.append(frame)
            frame = frame.f_back
        assert frame is not None, "the progress callback was not called under the task"
        path.append(frame)
        loops = [f for f in path if f.f_code is gpt.train.train_lm.__code__]
        assert loops, [_name(f) for f in path]
        chain = path[path.index(loops[0]) :]
        seen.setdefault("chain", [_name(f) for f in reversed(chain)])
        seen.setdefault("args", loops[0].f_locals["args"])
        seen.setdefault("total", total)

    monkeypatch.setattr(StageRun, "progress_sink", lambda self: look)
    out = task_fn(ctx, args, **inputs)

    chain = seen["chain"]
    assert len(chain) <= MOST_HOPS, " → ".join(chain)
    assert chain[0].startswith("tasks.stages.") and chain[-1] == "gpt.train:train_lm", chain
    assert "gpt.recipes.instruct:finetune_instruct" in chain, chain
    assert not any(n.startswith("prefect") for n in chain), chain
    assert seen["args"] is args  # the object the config built, not a copy re-validated
    assert seen["total"] == 1 and out.out.steps == 1  # max_steps=1 reached the loop


@pytest.mark.slow
def test_a_two_process_layout_takes_the_same_call_through_torchrun(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``distributed.nproc = 2`` the same stage call relaunches the recipe under
    torchrun (once), and rank 0's metrics reach the stage's catalog."""
    from gpt.args import InstructArgs
    from gpt.distributed import launch

    task_fn, ctx, inputs = _instruct_stage(tmp_path, tokenizer_dir)
    args = InstructArgs(epochs=1, batch_size=2, max_steps=2, eval_every=1, eval_batches=1,
                        sample_tokens=0, distributed={"nproc": 2, "backend": "gloo"})  # fmt: skip
    launched: list[list[str]] = []
    real = launch.launch_command
    monkeypatch.setattr(launch, "launch_command", lambda a, w: launched.append(real(a, w)) or launched[-1])  # fmt: skip
    out = task_fn(ctx, args, **inputs)
    assert out.out.steps == 2 and len(launched) == 1
    assert launched[0][launched[0].index("--nproc-per-node") + 1] == "2"
    df = ctx.catalog.query_df("SELECT DISTINCT step FROM metrics WHERE stage = 'finetune_instruct'")
    assert sorted(df["step"].dropna()) == [1, 2]
