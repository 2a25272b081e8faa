"""``gptflow catalog rebuild``: recreate the catalog from the artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="catalog maintenance (rebuild from the artifacts)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = actions.add_parser(
        "rebuild",
        help="recreate the catalog from artifacts/runs and artifacts/stages",
        description=(
            "Replay the run records and every committed stage folder into a catalog. The "
            "artifacts are the source of truth; the catalog is an index of them."
        ),
    )
    r.add_argument(
        "--db", type=Path, help="catalog to write (default: GPTFLOW_DB or artifacts/gptflow.duckdb)"
    )
    r.add_argument(
        "--artifacts",
        help="artifacts folder or object-store URL, e.g. s3://bucket/prefix "
        "(default: GPTFLOW_ARTIFACTS or artifacts/)",
    )
    r.add_argument(
        "--replace",
        action="store_true",
        help="rebuild an existing catalog (built beside it, swapped in when complete)",
    )
    r.set_defaults(func=cmd_rebuild)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from gpt.paths import artifacts_root, default_db_path, is_remote, local_path
    from tasks.rebuild import rebuild_into

    db = (args.db or default_db_path()).expanduser().resolve()
    art: str | Path = args.artifacts or artifacts_root()
    if not is_remote(art):
        art = local_path(art)
    report = rebuild_into(db, art, replace=args.replace)
    print(
        f"rebuilt {db} from {art}: {report.runs} runs ({report.stage_rows} stage rows), "
        f"{report.folders} stage folders, {report.history} replaced results "
        f"({report.rows} rows)"
    )
    for line in report.skipped:
        print(f"  skipped {line}")
    return 0
