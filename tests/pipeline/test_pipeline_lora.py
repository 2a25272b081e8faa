"""The smoke profile with LoRA on both finetunes, end to end through a real local Prefect
server (``gptflow run --profile smoke --set finetune_spam.lora=… --set
finetune_instruct.lora=… --mirror MIRROR``): adapter-only checkpoints that extraction
reads merged, a rerun that is all cache hits, the report's LoRA facts, and ``gptflow
compare`` of the LoRA run against a full finetune side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

LORA = [
    'finetune_spam.lora={"rank": 4, "alpha": 8}',
    "finetune_instruct.lora=true",
]


@pytest.fixture
def ollama():
    from benchmarks.ollama_stub import OllamaStub

    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 42")
    stub.start()
    yield stub
    stub.stop()


def _run(args: list[str], capsys: pytest.CaptureFixture) -> str:
    from flows.cli import main

    assert main(args) == 0, capsys.readouterr()
    first = capsys.readouterr().out.splitlines()[0]  # "run <id>: completed"
    assert first.endswith(": completed"), first
    return first.split()[1].rstrip(":")


def test_smoke_run_with_lora_end_to_end_and_cached_rerun(
    prefect_server, mirror: Path, ollama, capsys, tmp_path: Path
) -> None:
    from flows.report.blocks import to_markdown
    from flows.report.build import build_report
    from gpt.checkpoint import load_checkpoint
    from tasks.catalog import Catalog
    from tasks.catalog.compare import compare_runs

    cmd = ["run", "--profile", "smoke", "--mirror", str(mirror)]
    sets = [x for s in [*LORA, f"judge.hosts={ollama.host}"] for x in ("--set", s)]
    run1 = _run([*cmd, *sets], capsys)
    cat = Catalog()
    q = lambda sql, *p: cat.query_df(sql, list(p))  # noqa: E731
    stages = q("SELECT stage, status, outputs FROM stages WHERE run_id = ?", run1)
    assert set(stages.status) == {"completed"}, stages
    outs = {r.stage: json.loads(r.outputs) for r in stages.itertuples()}
    for stage, folder in (("finetune_spam", "classifier"), ("finetune_instruct", "checkpoint")):
        ckpt = Path(outs[stage]["root"]) / outs[stage][folder]
        assert (ckpt / "adapter.safetensors").exists(), stage
        assert not (ckpt / "model.safetensors").exists(), stage
        size = outs[stage]["model_size"]
        assert size["lora"]["rank"] == (4 if stage == "finetune_spam" else 16)
        base = load_checkpoint(ckpt, merge=False).adapter["base"]
        assert base["sha256"] == size["base"]["sha256"]
        where = (ckpt / base["relative"]).resolve()
        assert where.is_relative_to(Path(outs["load_gpt2"]["root"]).resolve())
    assert q("SELECT count(*) n FROM responses WHERE run_id = ?", run1).n[0] == 12
    summ = q("SELECT * FROM eval_summary WHERE run_id = ?", run1)
    assert summ.n_scored[0] == 12 and summ.mean_score[0] == 42
    sizes = q(
        "SELECT stage, name, value FROM metrics WHERE run_id = ? AND name IN "
        "('trainable_params', 'checkpoint_bytes')",
        run1,
    )
    assert len(sizes) == 4
    report = to_markdown(build_report(cat, run1))
    assert "LoRA rank 4, alpha 8" in report and "LoRA rank 16, alpha 16" in report

    # the same command again: every stage a cache hit, nothing sent to the judge again
    chats = ollama.chat_count
    run2 = _run([*cmd, *sets], capsys)
    again = q("SELECT stage, status, cache_hit FROM stages WHERE run_id = ?", run2)
    assert len(again) == len(stages) and again.cache_hit.all(), again
    assert ollama.chat_count == chats

    # a full finetune of the same profile (upstream stages cached), compared with LoRA
    full = _run([*cmd, "--set", f"judge.hosts={ollama.host}"], capsys)
    comp = compare_runs(cat, full, run1)
    assert {"finetune_spam.lora.rank", "finetune_instruct.lora.rank"} <= set(comp.config.path)
    m = comp.metrics.set_index(["section", "metric"])
    for stage in ("finetune_spam", "finetune_instruct"):
        row = m.loc[(stage, "trainable parameters")]
        assert row.a > 0 and row.b > 0 and row.a != row.b  # full vs LoRA, side by side
        assert m.loc[(stage, "checkpoint MB")].notna().all()
    assert m.loc[("finetune_spam", "finetuned test accuracy")].notna().all()
    assert m.loc[("finetune_instruct", "final val loss")].notna().all()
