"""load_gpt2: the base checkpoints of the finetunes — OpenAI's GPT-2 weights imported
(downloaded through the verified downloader), or the pretrain checkpoint
(``base_model = "scratch"``); each base evaluated once (:mod:`gpt.recipes.base`).

The release files it reads from the datasets folder are part of its key, by the sha256
their download is held to (published, or trust on first use: :mod:`gpt.data.trust`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt.data.sources import gpt2_source_name
from gpt.recipes.base import LoadGPT2Args, prepare_bases
from tasks.stages.contract import RunContext, StageOut, StageOutput, StageRun
from tasks.stages.download import check_held, fetch_sources, held_digests
from tasks.stages.runner import stage


class LoadGPT2Out(StageOut):
    """The base checkpoint folders (relative to this stage's folder)."""

    base_model: str
    spam_base: str
    """Checkpoint the spam classifier starts from."""
    instruct_base: str
    """Checkpoint the instruction finetune starts from."""
    evaluations: dict[str, dict[str, Any]]
    """Per base folder: a greedy sample and the validation perplexity."""


def release_sources(args: LoadGPT2Args) -> list[str]:
    """The registry names of the GPT-2 releases the settings import (none for scratch)."""
    return [gpt2_source_name(s, args.source) for s in args.sizes()]


def release_files(ctx: RunContext, args: LoadGPT2Args) -> dict[str, str]:
    """Path -> sha256 of each release file the settings read from the datasets folder."""
    return held_digests(ctx, release_sources(args)) if args.sizes() else {}


def fetch_releases(run: StageRun, args: LoadGPT2Args) -> dict[str, Path]:
    """Download (or verify) the GPT-2 release files of each size the settings need: the
    files the key holds (held to their published or trusted sha256)."""
    if not args.sizes():
        return {}
    results = fetch_sources(run.ctx, release_sources(args))
    check_held(results, run.files)
    return {s: r.folder for s, r in zip(args.sizes(), results, strict=True)}


@stage("load_gpt2", retries=2, reads=release_files)
def load_gpt2(
    run: StageRun, args: LoadGPT2Args, tokenize: StageOutput, pretrain: StageOutput | None
) -> LoadGPT2Out:
    releases = fetch_releases(run, args)  # first: a refused download fails fast
    res = prepare_bases(
        args,
        run.work,
        tokenizer_dir=tokenize.path(tokenize.out.tokenizer),
        val_tokens=tokenize.path(tokenize.out.val_tokens),
        pretrain_checkpoint=pretrain.path(pretrain.out.checkpoint) if pretrain else None,
        releases=releases,
        device=run.device,
    )
    metrics = []
    for folder, ev in res.evaluations.items():
        run.sample_sink()({"epoch": None, "step": None, **ev["sample"]})
        name = "perplexity" if folder == "scratch" else f"perplexity_{folder.removeprefix('gpt2-')}"
        metrics.append({"step": 0, "split": "val", "name": name, "value": ev["val_perplexity"]})
        run.checkpoint(run.work / folder)
    run.metrics_sink()(metrics)
    return LoadGPT2Out(
        base_model=args.base_model,
        spam_base=res.spam,
        instruct_base=res.instruct,
        evaluations=res.evaluations,
    )
