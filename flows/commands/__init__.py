"""One module per ``gptflow`` sub-command (or a few close ones). Each defines
``register(subparsers)``, which adds its parsers and sets ``func`` to a callable taking
the parsed ``argparse.Namespace`` and returning an exit code. Heavy imports (torch,
prefect, duckdb) happen inside ``func`` so that ``gptflow --help`` stays fast.

The pieces commands share live here: the ``--db``, ``--format`` and ``--retrust`` options, finding a
run in the catalog and its config, printing a table, and text from and to the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tasks.catalog import Catalog

#: What ``--db`` means for every command that reads the catalog (``Catalog(args.db)``
#: resolves it: the file when given, else the environment's choice).
DB_HELP = (
    "DuckDB catalog file to use (default: the DuckLake named by GPTFLOW_CATALOG_URL and "
    "GPTFLOW_CATALOG_DATA_PATH, else GPTFLOW_DB, else artifacts/gptflow.duckdb)"
)
#: The output formats of commands that print tables.
FORMATS = ("table", "csv", "json")


def add_db_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--db`` option of a command that reads or writes the catalog."""
    parser.add_argument("--db", metavar="FILE", help=DB_HELP)


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--format table|csv|json`` option of a command that prints tables."""
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default: table)"
    )


def add_retrust_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--retrust NAME`` option of a command that downloads the inputs."""
    parser.add_argument(
        "--retrust",
        action="append",
        default=[],
        metavar="NAME",
        help="accept a changed download of the files of this source (or file) that have no "
        "published sha256: fetch them again and record the new digest (repeatable)",
    )


def run_or_latest(cat: Catalog, ref: str | None) -> str:
    """The run ``ref`` names (its id or a unique prefix), else the latest run started."""
    from gpt.errors import CatalogError
    from tasks.catalog.lookup import latest_run, resolve_run

    run_id = resolve_run(cat, ref) if ref else latest_run(cat)
    if run_id is None:
        raise CatalogError(f"the catalog {cat.location} holds no runs yet: run `gptflow run` first")
    return run_id


def stored_config(cat: Catalog, run_id: str) -> dict[str, Any]:
    """The config run ``run_id`` recorded in ``runs`` (empty when it recorded none)."""
    import json

    df = cat.query_df("SELECT config FROM runs WHERE run_id = ?", [run_id])
    config = None if df.empty else df["config"].iloc[0]
    config = json.loads(config) if isinstance(config, str) else config
    return config if isinstance(config, dict) else {}


def print_df(df: pd.DataFrame, fmt: str = "table", **options: Any) -> None:
    """Print a query result in ``fmt`` (:func:`tasks.catalog.present.format_df`)."""
    from tasks.catalog.present import format_df

    write_line(format_df(df, fmt, **options).removesuffix("\n"))


def sections_text(
    fmt: str,
    sections: dict[str, pd.DataFrame],
    *,
    meta: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> str:
    """Several tables as one output: ``json``, one object (the ``meta`` fields, a list of
    row objects per section, then ``notes``); ``csv``, a block per section under a
    ``# name`` line (``meta`` and notes as ``#`` lines)."""
    import json

    from tasks.catalog.present import format_df

    if fmt == "json":
        out: dict[str, Any] = dict(meta or {})
        out.update({name: json.loads(format_df(df, "json")) for name, df in sections.items()})
        if notes is not None:
            out["notes"] = notes
        return json.dumps(out, indent=2, ensure_ascii=False) + "\n"
    parts = [f"# {k}: {v}\n" for k, v in (meta or {}).items()]
    parts += [f"# {name}\n{format_df(df, 'csv')}\n" for name, df in sections.items()]
    parts += [f"# note: {n}\n" for n in notes or []]
    return "".join(parts)


def from_argv(text: str) -> str:
    """``text`` from the command line with bytes that were not UTF-8 (which Python keeps
    as surrogate escapes) replaced by U+FFFD, so it can be tokenized and printed."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def write_line(line: str) -> None:
    """Write ``line`` (and a newline) to stdout whatever its encoding (unencodable
    characters become backslash escapes instead of raising UnicodeEncodeError)."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(line.encode(enc, "backslashreplace").decode(enc) + "\n")
