"""``gptflow download``: fetch (or verify and skip) the pipeline's public inputs."""

from __future__ import annotations

import argparse
import os

from flows.commands import add_db_arg, add_retrust_arg
from gpt.data.sources import DATASET_SOURCES, GPT2_SIZES, GPT2_WEIGHT_SOURCES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch and verify the datasets (and GPT-2 release files)",
        description=(
            "Download the inputs into the datasets folder, verifying each sha256; files "
            "already present and verified are skipped. By default: "
            + ", ".join(DATASET_SOURCES)
            + ". With a mirror (--mirror or GPTFLOW_MIRROR: a folder or http(s) base URL "
            "laid out like the datasets folder) only the mirror is used."
        ),
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        help="fetch only this source (repeatable); see --list",
    )
    parser.add_argument(
        "--gpt2-size",
        metavar="SIZE",
        action="append",
        choices=list(GPT2_SIZES),
        help=f"also fetch this GPT-2 release ({', '.join(GPT2_SIZES)}; repeatable)",
    )
    parser.add_argument(
        "--gpt2-source",
        choices=list(GPT2_WEIGHT_SOURCES),
        default="openai",
        help="GPT-2 weights: OpenAI's TensorFlow release (openai) or the HF safetensors (hf)",
    )
    add_retrust_arg(parser)
    parser.add_argument("--mirror", metavar="DIR_OR_URL", help="use only this mirror")
    parser.add_argument(
        "--dest", metavar="DIR", help="target folder (default: the datasets folder)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the known sources and exit")
    add_db_arg(parser)  # the catalog holds the digests of first downloads
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Fetch the selected sources and print what was fetched or skipped."""
    import pandas as pd

    from flows.commands import print_df
    from flows.report import fmt
    from gpt.data.download import download_sources
    from gpt.data.sources import get_source, gpt2_source_name, list_sources
    from gpt.data.trust import retrust_paths

    if args.list:
        rows = [[s.name, len(s.files), s.description] for s in list_sources()]
        print_df(
            pd.DataFrame(rows, columns=["source", "files", "description"]), uncut={"description"}
        )
        return 0
    names = list(args.only) if args.only else list(DATASET_SOURCES)
    for size in args.gpt2_size or []:
        name = gpt2_source_name(size, args.gpt2_source)
        if name not in names:
            names.append(name)
    for name in names:
        get_source(name)  # ConfigError listing the known names
    again = retrust_paths(args.retrust)  # ConfigError for an unknown or pinned name
    for src in list_sources():  # a retrusted file is fetched: its source is downloaded
        if src.name not in names and any(f.path in again for f in src.files):
            names.append(src.name)
    from tasks.catalog import Catalog
    from tasks.stages.download import source_rows
    from tasks.store.lease import file_leases

    catalog = Catalog(args.db)
    results = download_sources(
        names,
        args.dest,
        mirror=args.mirror,
        progress=not args.no_progress,
        trusted=catalog.source_digests(),  # files with no published sha256: first use
        lease=file_leases(f"gptflow-download-{os.getpid()}"),  # one writer per file
        retrust=args.retrust,
    )
    catalog.upsert_rows("sources", source_rows(results), key=["name"])  # as the pipeline
    rows = []
    for res in results:
        for f in res.files:
            rows.append(
                [
                    res.name,
                    f.relpath,
                    "skipped (verified)" if f.skipped else "fetched",
                    fmt.size(f.bytes),
                    f.sha256[:12],
                    f.url or "",
                ]
            )
            for p in f.extracted:
                rows.append(
                    ["", f"  -> {os.path.relpath(p, f.path.parent)}", "extracted", "", "", ""]
                )
    table = pd.DataFrame(rows, columns=["source", "file", "status", "size", "sha256", "from"])
    print_df(table, uncut={"file", "from"})
    return 0
