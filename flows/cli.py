"""The ``gptflow`` command line.

What it promises about errors: a user error — anything gptflow raises on purpose (a
:class:`~gpt.errors.GPTFlowError`: a bad setting, a missing file, checkpoint or run, a
refused query) and a command line the parser rejects — ends the command with exactly one
line on stderr, ``gptflow CMD: error: …``, naming the thing and the fix, and exit status
1 (2 for a rejected command line); ``-v`` adds the traceback and the full text. Output
cut short by a closed pipe (``gptflow runs | head``) ends quietly with the status a
Unix tool killed by SIGPIPE has (141). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from gpt.errors import GPTFlowError, one_line

#: Exit status of a command whose output pipe was closed (128 + SIGPIPE, as for `yes | head`).
EXIT_PIPE_CLOSED = 141


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and the way to
    its help (argparse prints the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


#: Sub-command modules under ``flows.commands``, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "run",
    "runs",
    "environment",
    "deploy",
    "report",
    "download",
    "generate",
    "classify",
    "convert_gpt2",
    "export",
    "judge_responses",
    "evals",
    "compare",
    "sql",
    "catalog",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command registered."""
    parser = _Parser(
        prog="gptflow",
        description="Build-a-GPT-from-scratch as a re-runnable Prefect pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    for command in sub.choices.values():  # -v after the command name works too
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    return parser


#: Sub-commands that may train a model in this process (the pipeline, the benchmarks):
#: they start with the malloc tunables (:func:`restart_with_malloc_tunables`).
TRAINING_COMMANDS = frozenset({"run", "bench"})


def restart_with_malloc_tunables(args: list[str]) -> None:
    """For a command in :data:`TRAINING_COMMANDS` (the first word of ``args`` that is not
    an option), re-execute this process with :data:`gpt.heap.MALLOC_TUNABLES` in
    ``GLIBC_TUNABLES``: glibc reads them only when a process starts, and training then
    reuses its freed memory instead of page-faulting it in again every step (one more
    interpreter start, ~0.05 s). Does nothing for other commands, off glibc, when a
    ``glibc.malloc.*`` tunable is already set, or if the exec fails."""
    from gpt.heap import tunables_env

    command = next((a for a in args if not a.startswith("-")), None)
    env = tunables_env(os.environ) if command in TRAINING_COMMANDS else None
    if env is None or not sys.executable:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gptflow`` console script (run as a command, i.e. without
    ``argv``, it first restarts itself with the malloc tunables)."""
    if argv is None:
        restart_with_malloc_tunables(sys.argv[1:])
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return code
    except GPTFlowError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"gptflow {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so nothing more is written to the closed pipe (Python
    would report the failed flush at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (e.g. captured by a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
