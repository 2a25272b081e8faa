"""The ``gptflow`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gpt.errors import GPTFlowError

#: Sub-command modules under ``flows.commands``, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "run",
    "deploy",
    "report",
    "download",
    "generate",
    "classify",
    "convert_gpt2",
    "export",
    "judge",
    "evals",
    "compare",
    "sql",
    "catalog",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="gptflow",
        description="Build-a-GPT-from-scratch as a re-runnable Prefect pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"flows.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not written yet
            if exc.name == f"flows.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gptflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # one line per HTTP request to the Prefect API is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GPTFlowError as exc:
        print(f"gptflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
