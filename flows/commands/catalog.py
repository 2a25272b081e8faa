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
    where = r.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        type=Path,
        metavar="FILE",
        help="DuckDB catalog file to write (default: the environment's catalog: the DuckLake "
        "named by GPTFLOW_CATALOG_URL, else GPTFLOW_DB, else artifacts/gptflow.duckdb)",
    )
    where.add_argument(
        "--url",
        metavar="DUCKLAKE_URL",
        help="fill this DuckLake instead, e.g. 'ducklake:postgres:dbname=lake host=H "
        "port=5432 user=U' (password: PGPASSWORD or ~/.pgpass)",
    )
    r.add_argument(
        "--data-path",
        metavar="PATH",
        help="the DuckLake's data folder or s3://bucket/prefix/ (default: "
        "GPTFLOW_CATALOG_DATA_PATH); S3 credentials come from the environment",
    )
    r.add_argument(
        "--artifacts",
        help="artifacts folder or object-store URL, e.g. s3://bucket/prefix "
        "(default: GPTFLOW_ARTIFACTS or artifacts/)",
    )
    r.add_argument(
        "--replace",
        action="store_true",
        help="rebuild an existing catalog: a file is built beside it and swapped in when "
        "complete; a lake's rebuilt tables are emptied first (sources, benchmarks kept)",
    )
    r.add_argument(
        "--allow-empty",
        action="store_true",
        help="build even from artifacts without run records, and with --replace replace a "
        "catalog by one holding fewer rows (refused otherwise)",
    )
    r.set_defaults(func=cmd_rebuild)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from gpt.paths import artifacts_root, is_remote, local_path
    from tasks.catalog import CatalogArgs
    from tasks.records.rebuild import rebuild_into

    target = CatalogArgs(url=args.url, data_path=args.data_path, path=args.db).resolve()
    art: str | Path = args.artifacts or artifacts_root()
    if not is_remote(art):
        art = local_path(art)
    report = rebuild_into(target, art, replace=args.replace, allow_empty=args.allow_empty)
    print(
        f"rebuilt {target.location()} from {art}: {report.runs} runs "
        f"({report.stage_rows} stage rows), {report.folders} stage folders, "
        f"{report.history} replaced results ({report.rows} rows), "
        f"{report.sources} download records restored"
    )
    for line in report.skipped:
        print(f"  skipped {line}")
    return 0
