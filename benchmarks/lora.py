"""LoRA against the full finetune: what a training step costs, and what the finetunes
reach.

``lora_step``: for the 124M-shaped spam classifier and the 355M-shaped instruction model
(``quick``: tiny shapes), one optimizer step of the recipe's full finetune (baseline)
against its LoRA finetune (the book's setting: rank 16, alpha 16, every linear layer):
seconds per step, sides interleaved in one process after warm-up, and the peak memory
of each side measured alone in a fresh process (``VmHWM``: weights, gradients, AdamW
state and activations of two steps).

* spam: the recipe's default (last block, final norm and head trained, the frozen
  prefix's activations computed once, as the finetune caches them) vs LoRA (every block
  adapted: nothing to cache but the embeddings, backward through all blocks, but only
  the adapters get gradients and AdamW state);
* instruct: every weight trained vs LoRA, a next-token loss on a random batch.

``lora_quality``: a profile's pipeline (``quick``: ``smoke``, else ``cpu``) run as is
and with ``lora`` on both finetunes, in one fresh folder (the stages before the
finetunes are shared through the cache): spam accuracies per split and the instruction
finetune's final losses side by side, with trainable parameters and checkpoint sizes.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.core import (
    BenchResult,
    BenchSkipped,
    completed_run,
    fresh_folders,
    gptflow,
    interleaved,
    method_text,
    pick_device,
    setup_device,
    spread,
)

__all__ = ["bench_lora_quality", "bench_lora_step", "lora_step_child"]

#: Per workload: model config, batch, tokens per sequence (full / quick).
WORKLOADS: dict[str, dict[str, Any]] = {
    "spam": {"model": "gpt2-small", "batch": 8, "tokens": 120},
    "instruct": {"model": "gpt2-medium", "batch": 2, "tokens": 256},
}
QUICK = {"spam": {"model": "tiny", "batch": 8, "tokens": 48},
         "instruct": {"model": "mini", "batch": 2, "tokens": 96}}  # fmt: skip


class _Step:
    """One workload's side: a seeded model set up as the recipe does, its optimizer and
    a fixed batch; calling it runs one optimizer step."""

    def __init__(
        self,
        workload: str,
        side: str,
        spec: dict[str, Any],
        device: torch.device,
        share: _Step | None = None,
    ) -> None:
        from gpt.lora import LoraArgs, count_trainable
        from gpt.model import GPT, get_config
        from gpt.recipes.classifier import SpamArgs, prepare_classifier
        from gpt.recipes.classifier_model import n_frozen_blocks, prefix_hidden, set_modes

        torch.manual_seed(123)
        cfg = get_config(spec["model"], drop_rate=0.0)
        model = GPT(cfg)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["tokens"]), generator=g)
        self.workload, self.device = workload, device
        self._share(model, share)
        if workload == "spam":
            args = SpamArgs(lora=True) if side == "lora" else SpamArgs()
            prepare_classifier(model, args, base_dir=None)
            model.to(device)
            self.n_frozen = n_frozen_blocks(model)
            set_modes(model, self.n_frozen, train=False)
            with torch.no_grad():  # computed once per split by the finetune
                self.inputs = prefix_hidden(model, ids.to(device), self.n_frozen)
            set_modes(model, self.n_frozen, train=True)
            self.targets = torch.randint(0, 2, (spec["batch"],), generator=g).to(device)
        else:
            if side == "lora":
                from gpt.adapter import adapt

                adapt(model, LoraArgs(), base_dir=None, seed=123)
            model.to(device).train()
            self.inputs, self.targets = ids.to(device), torch.roll(ids, -1, 1).to(device)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = count_trainable(model)
        self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

    def _share(self, model: torch.nn.Module, share: _Step | None) -> None:
        """Frozen weights of ``model`` read the other side's storage (same values at the
        start; the timings do not depend on them), so both sides fit in memory once."""
        if share is None:
            return
        theirs = dict(share.model.named_parameters())
        for name, p in model.named_parameters():
            q = theirs.get(name)
            if q is not None and q.shape == p.shape:
                p.data = q.data

    def __call__(self) -> float:
        from gpt.recipes.classifier_model import suffix_logits

        self.opt.zero_grad(set_to_none=True)
        if self.workload == "spam":
            logits = suffix_logits(self.model, self.inputs, self.n_frozen, None)
            loss = F.cross_entropy(logits, self.targets)
        else:
            logits = self.model(self.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def lora_step_child(workload: str, side: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: two steps of one side; its peak RSS and trainable count."""
    step = _Step(workload, side, spec, torch.device("cpu"))
    step()
    step()
    return {"peak_rss": _peak_rss(), "trainable": step.trainable}


def _child(workload: str, side: str, spec: dict[str, Any]) -> dict[str, Any]:
    from gpt.paths import project_root

    code = (
        "import json, sys; from benchmarks.lora import lora_step_child; "
        "print(json.dumps(lora_step_child(*json.loads(sys.argv[1]))))"
    )
    path = os.pathsep.join(p for p in (str(project_root()), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps([workload, side, spec])],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lora_step child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_lora_step(quick: bool = False) -> BenchResult:
    """Seconds per optimizer step and peak memory, full finetune vs LoRA, for the spam
    classifier and the instruction model (module docstring). Figure: the instruction
    model's seconds per step; everything else in ``details``."""
    device = pick_device()
    setup_device(device)
    specs = QUICK if quick else WORKLOADS
    per: dict[str, dict[str, Any]] = {}
    method = ""
    for workload, spec in specs.items():
        full = _Step(workload, "full", spec, device)
        steps = {"full": full, "lora": _Step(workload, "lora", spec, device, share=full)}
        t = interleaved(
            {"baseline": steps["full"], "optimized": steps["lora"]},
            repeats=3 if quick else 4,
            warmup=1,
            device=device,
        )
        method = method_text(t, "peak memory: each side alone in a fresh CPU process (VmHWM)")
        trainable = {side: step.trainable for side, step in steps.items()}
        del steps, full
        gc.collect()
        mem = {side: _child(workload, side, spec) for side in ("full", "lora")}
        mb = 1024 * 1024
        per[workload] = {
            "model": spec["model"],
            "batch": spec["batch"],
            "tokens": spec["tokens"],
            "s_per_step_full": t.median("baseline"),
            "s_per_step_lora": t.median("optimized"),
            "spread": {
                "full": spread(t.seconds["baseline"]),
                "lora": spread(t.seconds["optimized"]),
            },
            "peak_rss_mb_full": mem["full"]["peak_rss"] / mb,
            "peak_rss_mb_lora": mem["lora"]["peak_rss"] / mb,
            "trainable_full": trainable["full"],
            "trainable_lora": trainable["lora"],
        }
    inst = per["instruct"]
    return BenchResult(
        name="lora_step",
        baseline=inst["s_per_step_full"],
        optimized=inst["s_per_step_lora"],
        ratio=inst["s_per_step_full"] / inst["s_per_step_lora"],
        unit="s/step",
        workload=(
            f"instruct {inst['model']} batch {inst['batch']}×{inst['tokens']} (figure); spam "
            f"{per['spam']['model']} batch {per['spam']['batch']}×{per['spam']['tokens']} "
            "(details); random weights and tokens"
        ),
        baseline_label="full finetune (spam: last block + norm + head, prefix cached)",
        optimized_label="LoRA r16 α16, every linear layer, base frozen",
        method=method,
        spread={"baseline": inst["spread"]["full"], "optimized": inst["spread"]["lora"]},
        details={"device": device.type, "quick": quick, **per},
        target="LoRA trains < 5% of the instruction model's parameters, in less peak memory",
        met=None  # quick: toy shapes whose vocabulary head dominates every count
        if quick
        else inst["trainable_lora"] < 0.05 * inst["trainable_full"]
        and inst["peak_rss_mb_lora"] < inst["peak_rss_mb_full"],
    )


# --------------------------------------------------------------------------- quality


def _finetune_figures(db: Path, run_id: str) -> dict[str, Any]:
    from tasks.catalog import Catalog
    from tasks.catalog.rundata import RunData

    data = RunData(Catalog(db), run_id)
    head = data.headline()
    out = {
        f"{s} {m}": float(v)
        for s, m, v in zip(head["section"], head["metric"], head["value"], strict=True)
        if s in ("finetune_spam", "finetune_instruct")
    }
    stages = Catalog(db).query_df(
        "SELECT stage, outputs FROM stages WHERE run_id = ? AND stage LIKE 'finetune_%'",
        [run_id],
    )
    for stage, raw in zip(stages["stage"], stages["outputs"], strict=True):
        o = json.loads(raw)
        out[f"{stage} train_s"] = (o.get("timings") or {}).get("train_s")
    return out


def bench_lora_quality(
    mirror: str | None, quick: bool = False, *, timeout: float = 7200.0
) -> BenchResult:
    """A profile's finetunes full vs LoRA (module docstring). Figure: the spam
    classifier's test accuracy; the rest in ``details``."""
    from benchmarks.ollama_stub import OllamaStub

    mirror = mirror or os.environ.get("GPTFLOW_MIRROR")
    if not mirror:
        raise BenchSkipped(
            "lora_quality needs the inputs offline: pass --mirror FOLDER or set GPTFLOW_MIRROR"
        )
    profile = "smoke" if quick else "cpu"
    stub = OllamaStub(models=["llama3"], reply=lambda req: "Score: 50")
    stub.start()
    try:
        with fresh_folders("gptflow-bench-lora-") as (folder, env):
            common = ["--profile", profile, "--mirror", mirror, "--set", f"judge.hosts={stub.host}"]
            lora = ["--set", "finetune_spam.lora=true", "--set", "finetune_instruct.lora=true"]
            full_run = completed_run(gptflow(["run", *common], env, timeout))
            lora_run = completed_run(gptflow(["run", *common, *lora], env, timeout))
            db = folder / "catalog.duckdb"
            full, low = _finetune_figures(db, full_run), _finetune_figures(db, lora_run)
    finally:
        stub.stop()
    key = "finetune_spam finetuned test accuracy"
    return BenchResult(
        name="lora_quality",
        baseline=100 * full[key],
        optimized=100 * low[key],
        ratio=low[key] / full[key] if full[key] else float("nan"),
        unit="% test accuracy",
        workload=f"{profile} profile pipeline, spam + instruction finetunes",
        baseline_label="full finetune (the profile as is)",
        optimized_label="finetune_spam.lora=true, finetune_instruct.lora=true",
        method="one run per side in one fresh folder (stages before the finetunes shared "
        "through the cache); figures read from the catalog",
        details={"profile": profile, "full": full, "lora": low, "quick": quick},
        target="",
        met=None,
    )
