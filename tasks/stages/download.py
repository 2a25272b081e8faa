"""download: fetch (or verify) the datasets and tokenizer files into ``datasets/``.

Not a cached stage folder: the downloader itself skips files already present and
verified, and the stage's digest is the sha256 of the files, so downstream keys follow
the bytes. ``--force download`` fetches and verifies everything again.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gpt.data.download import DownloadArgs
from gpt.data.sources import DATASET_SOURCES
from tasks.cache import StageOutput, content_digest
from tasks.lease import file_leases
from tasks.stages.base import RunContext, StageOut, now

STAGE = "download"


class SourceOut(BaseModel):
    """One downloaded source; paths relative to the datasets folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """The main usable file (an archive's first extracted member)."""
    folder: str
    """The folder holding the source's files."""
    sha256: list[str]
    """sha256 of each file of the source."""


class DownloadOut(StageOut):
    """The inputs, by registry name (e.g. ``the-verdict``, ``sms-spam``)."""

    sources: dict[str, SourceOut]


def run_download(ctx: RunContext, args: DownloadArgs) -> StageOutput:
    """Fetch the datasets and tokenizer files and record them in ``sources``."""
    started = now()
    rec = ctx.recorder
    root = Path(ctx.datasets)
    rec.record_stage(ctx.run_id, STAGE, status="running", started_at=started)
    try:
        # one writer per file (a second run waits, then finds it present and verified)
        results = args.fetch(
            list(DATASET_SOURCES),
            root,
            mirror=ctx.mirror,
            progress=ctx.progress,
            refresh=STAGE in ctx.force,
            lease=file_leases(ctx.run_id),
        )
        cat = ctx.catalog
        for res in results:
            for f in res.files:
                name = f"{res.name}:{f.relpath}" if len(res.files) > 1 else res.name
                cat.record_source(name, f.url or "", f.sha256, f.bytes)
    except BaseException as exc:
        rec.record_stage(
            ctx.run_id,
            STAGE,
            status="failed",
            started_at=started,
            message=f"{type(exc).__name__}: {exc}"[:4000],
        )
        raise
    out = DownloadOut(
        sources={
            r.name: SourceOut(
                path=r.path.relative_to(root).as_posix(),
                folder=r.folder.relative_to(root).as_posix(),
                sha256=[f.sha256 for f in r.files],
            )
            for r in results
        }
    )
    skipped = all(f.skipped for r in results for f in r.files)
    result = StageOutput(
        stage=STAGE,
        key="",
        root=str(root),
        run_id=ctx.run_id,
        digest=content_digest({}, {k: v.sha256 for k, v in out.sources.items()}),
        out=out,
        cache_hit=skipped,
    )
    rec.record_stage(
        ctx.run_id,
        STAGE,
        status="cached" if skipped else "completed",
        started_at=started,
        cache_hit=skipped,
        outputs={"root": str(root), "digest": result.digest, **result.data},
    )
    return result
