"""load_gpt2: the base checkpoints of the finetunes — OpenAI's GPT-2 weights imported
(downloaded through the verified downloader), or the pretrain checkpoint
(``base_model = "scratch"``); each base evaluated once (:mod:`gpt.recipes.base`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt.data.download import DownloadArgs
from gpt.data.sources import gpt2_source_name
from gpt.recipes.base import LoadGPT2Args, prepare_bases
from tasks.cache import StageOutput
from tasks.lease import file_leases
from tasks.stages.base import StageOut, StageRun, stage


class LoadGPT2Out(StageOut):
    """The base checkpoint folders (relative to this stage's folder)."""

    base_model: str
    spam_base: str
    """Checkpoint the spam classifier starts from."""
    instruct_base: str
    """Checkpoint the instruction finetune starts from."""
    evaluations: dict[str, dict[str, Any]]
    """Per base folder: a greedy sample and the validation perplexity."""


def fetch_releases(run: StageRun, args: LoadGPT2Args, download: DownloadArgs) -> dict[str, Path]:
    """Download (or verify) the GPT-2 release files of each size the settings need."""
    if not args.sizes():
        return {}
    cat = run.ctx.catalog
    results = download.fetch(
        [gpt2_source_name(s, args.source) for s in args.sizes()],
        run.ctx.datasets,
        mirror=run.ctx.mirror,
        progress=run.progress,
        trusted=cat.source_digests(),  # files without a published sha256: trust on first use
        lease=file_leases(run.ctx.run_id),  # one writer per file across runs
    )
    for res in results:
        for f in res.files:
            cat.record_source(f"{res.name}:{f.relpath}", f.url or "", f.sha256, f.bytes)
    return {s: r.folder for s, r in zip(args.sizes(), results, strict=True)}


@stage("load_gpt2", retries=2)
def load_gpt2(
    run: StageRun, args: LoadGPT2Args, tokenize: StageOutput, pretrain: StageOutput | None
) -> LoadGPT2Out:
    res = prepare_bases(
        args,
        run.work,
        tokenizer_dir=tokenize.path(tokenize.out.tokenizer),
        val_tokens=tokenize.path(tokenize.out.val_tokens),
        pretrain_checkpoint=pretrain.path(pretrain.out.checkpoint) if pretrain else None,
        releases=fetch_releases(run, args, run.ctx.download or DownloadArgs()),
        device=run.device,
    )
    metrics = []
    for folder, ev in res.evaluations.items():
        run.sample_sink()({"epoch": None, "step": None, **ev["sample"]})
        name = "perplexity" if folder == "scratch" else f"perplexity_{folder.removeprefix('gpt2-')}"
        metrics.append({"step": 0, "split": "val", "name": name, "value": ev["val_perplexity"]})
        run.record_checkpoint(folder)
    run.metrics_sink()(metrics)
    return LoadGPT2Out(
        base_model=args.base_model,
        spam_base=res.spam,
        instruct_base=res.instruct,
        evaluations=res.evaluations,
    )
