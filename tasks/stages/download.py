"""download: fetch (or verify) the datasets and tokenizer files into ``datasets/``.

Not a cached stage folder: the downloader itself skips files already present and
verified, and the stage's digest is the sha256 of the files, so downstream keys follow
the bytes. ``--force download`` fetches and verifies everything again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gpt.data.download import DownloadArgs, DownloadResult, expected_digests
from gpt.data.sources import DATASET_SOURCES
from gpt.errors import GPTFlowError
from tasks.stages.contract import RunContext, StageOut, StageRun
from tasks.stages.runner import stage
from tasks.store.lease import file_leases


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


def source_rows(results: Sequence[DownloadResult]) -> list[dict[str, Any]]:
    """The ``sources`` rows of downloaded files: a source of several files has one row per
    file, named ``<source>:<path>`` (the trust-on-first-use record of each file)."""
    return [
        {
            "name": f"{res.name}:{f.relpath}" if len(res.files) > 1 else res.name,
            "url": f.url or "",
            "sha256": f.sha256,
            "bytes": int(f.bytes),
            "fetched_at": f.fetched_at,
        }
        for res in results
        for f in res.files
    ]


def fetch_sources(
    ctx: RunContext,
    names: Sequence[str],
    *,
    args: DownloadArgs | None = None,
    refresh: bool = False,
    retrust: Sequence[str] = (),
) -> list[DownloadResult]:
    """Download (or verify) sources into the run's datasets folder, held to their trust
    records, and record them in the run's record and the catalog (``sources``)."""
    results = (args or ctx.download or DownloadArgs()).fetch(
        list(names),
        ctx.datasets,
        mirror=ctx.mirror,
        progress=ctx.progress,
        refresh=refresh,
        trusted=ctx.catalog.source_digests(),
        retrust=retrust,
        lease=file_leases(ctx.run_id),  # one writer per file across runs
    )
    ctx.recorder.record_sources(ctx.run_id, source_rows(results))
    return results


def held_digests(ctx: RunContext, names: Sequence[str]) -> dict[str, str]:
    """Path -> sha256 of every file of ``names`` as a stage will read it from the
    datasets folder: the digest its download is held to (published, or the trust
    record's), known without fetching; files only a download can tell (first use, or
    named by ``--retrust``) are fetched now."""
    known = expected_digests(
        names, ctx.datasets, trusted=ctx.catalog.source_digests(), retrust=ctx.retrust
    )
    if all(v is not None for v in known.values()):
        return {k: v for k, v in known.items() if v is not None}
    results = fetch_sources(ctx, names, retrust=ctx.retrust)
    return {f.relpath: f.sha256 for res in results for f in res.files}


def check_held(results: Sequence[DownloadResult], held: dict[str, str]) -> None:
    """Raise when a downloaded file is not the one a stage's key holds (``held``)."""
    for res in results:
        for f in res.files:
            if f.relpath in held and held[f.relpath] != f.sha256:
                raise GPTFlowError(
                    f"{f.path}: sha256 {f.sha256[:16]}… is not the {held[f.relpath][:16]}… the "
                    "stage's key was computed with (its trust record changed during the run); "
                    "run again"
                )


@stage("download", retries=2, kept=False)
def download(run: StageRun, args: DownloadArgs) -> DownloadOut:
    """Fetch the datasets and tokenizer files and record them in ``sources``."""
    root = Path(run.ctx.datasets)
    results = fetch_sources(
        run.ctx, DATASET_SOURCES, args=args, refresh=run.forced, retrust=run.ctx.retrust
    )
    run.reused = all(f.skipped for r in results for f in r.files)
    return DownloadOut(
        sources={
            r.name: SourceOut(
                path=r.path.relative_to(root).as_posix(),
                folder=r.folder.relative_to(root).as_posix(),
                sha256=[f.sha256 for f in r.files],
            )
            for r in results
        }
    )
