"""The docs stay true to the repository: every relative link in README.md and docs/*.md
resolves (the file, and the heading an ``#anchor`` names), and every ``gptflow …``
command they name parses with the real command-line parser (``flows.cli.build_parser``):
the sub-command exists, each flag is one of its flags, each value fits its choices and
type, and the settings a ``--set`` names build a valid config.

Commands are read from code blocks (a whole command: what a reader pastes) and from
inline code in prose (a command named with some of its flags: the arguments it requires
may be left out). Placeholders stand for values: an upper-case word (``RUN``, ``FILE``,
``RUN_A``), ``…`` or ``...`` (more of the same, or a value left out), ``a|b|c``
(alternatives; the first is tried) and ``[…]`` around optional parts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from _paths import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|…|\.\.\.|^<[^>]+>$")
ELLIPSIS = {"…", "...", "[…]", "[...]"}
ALTERNATIVES = re.compile(r"^[\w.:-]+(\|[\w.:-]+)+$")
ERROR_LINE = re.compile(r"^gptflow [\w-]+: error: ")
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<"}


# --------------------------------------------------------------------------- markdown
@dataclass
class Block:
    """A fenced code block: its language (the fence's info string), the line number of
    its first line, its lines."""

    language: str
    first: int
    lines: list[str]


def prose_and_code(text: str) -> tuple[str, list[Block]]:
    """The text with fenced code blocks blanked (line numbers kept), and the blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    current: list[str] | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        if FENCE.match(line):
            if current is None:
                current = []
                blocks.append(Block(FENCE.sub("", line).strip(), number + 1, current))
            else:
                current = None
            prose.append("")
        elif current is not None:
            current.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links reduced to their text) in lower
    case, without characters other than letters, digits, '_', '-' and spaces, each space
    a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = (
        c
        for c in text
        if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file: its headings' slugs (a repeated one gets -1, -2,
    …) and explicit ``<a id=…>`` anchors."""
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose.split("\n"):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def link_problems(path: Path, root: Path) -> list[str]:
    """What is wrong with the relative links of one markdown file (empty: nothing)."""
    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    # links inside inline code are examples, not links
    prose = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    problems = []
    for m in LINK.finditer(prose):
        target = m.group(2)
        where = f"{path.relative_to(root)}:{prose.count(chr(10), 0, m.start()) + 1}"
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: {target} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: {target}: {resolved.name} has no heading #{anchor}")
    return problems


# --------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Command:
    """A ``gptflow …`` command line found in a doc: where, its words, and whether it is
    a whole command (a code block) or one named in prose (inline code)."""

    where: str
    words: tuple[str, ...]
    whole: bool
    fails: bool = False
    """A transcript shows it failing (its next line is ``gptflow …: error: …``)."""

    def __str__(self) -> str:
        return f"{self.where}: gptflow {shlex.join(self.words)}"


def _unbracket(line: str) -> str:
    """The line without the brackets that mark optional parts (``[--flag VALUE]``): a
    ``[`` that starts a word outside quotes and the ``]`` that closes it."""
    out: list[str] = []
    quote: str | None = None
    opened: list[bool] = []  # per open bracket: is it an optional-part one (dropped)?
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "[":
            opened.append(i == 0 or line[i - 1].isspace() or line[i - 1] == "[")
            c = " " if opened[-1] else c
        elif c == "]" and opened:
            c = " " if opened.pop() else c
        out.append(c)
    return "".join(out)


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # a quote left open: not shell
        return line.split()


def _words(line: str) -> list[str] | None:
    """A shell line as words: optional-part brackets dropped, cut at the first pipe or
    redirection, leading ``NAME=value`` assignments skipped; None when it is no
    ``gptflow`` command (``make run ARGS="…"`` is ``gptflow run …``)."""
    words = _split(_unbracket(line))
    for i, word in enumerate(words):
        if word in SHELL_BREAKS:
            words = words[:i]
            break
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if words[:2] == ["make", "run"]:
        args = [w.partition("=")[2] for w in words[2:] if w.startswith("ARGS=")]
        return ["run", *_split(_unbracket(args[0]))] if args else ["run"]
    if words and Path(words[0]).name == "gptflow":
        return words[1:]
    return None


COMMAND_START = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*(\S*/)?(gptflow|make run)\b")


def _logical_lines(lines: list[str]) -> list[tuple[int, str]]:
    """Shell lines with ``\\`` continuations joined, and a command's quote left open
    joined with the lines that close it."""
    out: list[tuple[int, str]] = []
    start, buffer = 0, ""
    for offset, line in enumerate(lines):
        if not buffer:
            start = offset
        buffer = f"{buffer} {line.strip()}" if buffer else line.strip()
        if buffer.endswith("\\"):
            buffer = buffer[:-1]
            continue
        if COMMAND_START.match(buffer):
            try:
                shlex.split(buffer, comments=True)
            except ValueError:  # a quote spans lines
                continue
        out.append((start, buffer))
        buffer = ""
    if buffer:
        out.append((start, buffer))
    return out


def commands_in(path: Path, root: Path) -> list[Command]:
    """Every ``gptflow`` command a markdown file names."""
    text = path.read_text(encoding="utf-8")
    prose, blocks = prose_and_code(text)
    name = path.relative_to(root)
    found: list[Command] = []
    for block in blocks:
        if block.language in ("python", "toml", "json", "yaml"):
            continue
        lines, first = block.lines, block.first
        prompts = [line.startswith("$ ") for line in lines]
        failing = {
            i for i in range(len(lines) - 1) if prompts[i] and ERROR_LINE.match(lines[i + 1])
        }
        if any(prompts):  # a transcript: only the prompted lines are commands
            lines = [line[2:] if p else "" for line, p in zip(lines, prompts, strict=True)]
        for offset, line in _logical_lines(lines):
            words = _words(line)
            if words is not None:
                where = f"{name}:{first + offset}"
                found.append(Command(where, tuple(words), whole=True, fails=offset in failing))
    for m in INLINE_CODE.finditer(prose):
        span = " ".join(m.group(2).split())
        if not re.match(r"^(make run |(\S*/)?gptflow )", span):
            continue
        words = _words(span)
        if words:
            line = prose.count("\n", 0, m.start()) + 1
            found.append(Command(f"{name}:{line}", tuple(words), whole=False))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _sample(action: argparse.Action, word: str) -> str:
    """A value for a placeholder that the action accepts (a placeholder names no real
    value: any the action takes will do)."""
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "1"
    return word


def check_command(parser: argparse.ArgumentParser, command: Command) -> str | None:
    """Why the real parser rejects the command (None: it accepts it). Placeholders are
    given values their argument accepts; a command named in prose, or one with ``…``,
    may leave out arguments the parser requires."""
    words = list(command.words)
    if not words or PLACEHOLDER.search(words[0]) or words[0].endswith(":"):
        return None  # `gptflow CMD …`, or a message (`gptflow run: error: …`)
    path: list[str] = []
    leaf = parser
    while (sub := _subparsers(leaf)) is not None and words:
        if words[0] not in sub.choices:
            where = " ".join(["gptflow", *path])
            return f"{where} has no sub-command {words[0]!r} (it has: {', '.join(sub.choices)})"
        path.append(words.pop(0))
        leaf = sub.choices[path[-1]]
    if not words:
        return None  # the command named alone: it exists
    elided = not command.whole
    positionals = [a for a in leaf._actions if not a.option_strings]
    argv: list[str] = []
    pending: argparse.Action | None = None
    for word in words:
        if ALTERNATIVES.match(word):
            word = word.split("|")[0]
        if word in ELLIPSIS:
            if pending is not None and pending.nargs in (None, 1):
                argv.append(_sample(pending, word))
                pending = None
            else:
                elided = True
            continue
        if word.startswith("-") and not re.match(r"^-\d", word):
            flag, has_value, _ = word.partition("=")
            action = leaf._option_string_actions.get(flag)
            if action is None:  # (argparse would say so only after missing arguments)
                flags = sorted(o for o in leaf._option_string_actions if o.startswith("--"))
                return f"gptflow {' '.join(path)} has no flag {flag} (it has: {', '.join(flags)})"
            pending = action if action is not None and action.nargs != 0 and not has_value else None
            argv.append(word)
            continue
        target = pending if pending is not None else (positionals[0] if positionals else None)
        if pending is not None and pending.nargs in (None, 1, "?"):
            pending = None
        elif pending is None and positionals and positionals[0].nargs in (None, 1, "?"):
            positionals.pop(0)
        argv.append(_sample(target, word) if target and PLACEHOLDER.search(word) else word)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args([*path, *argv])
    except SystemExit:
        message = err.getvalue().strip()
        if elided and "the following arguments are required" in message:
            return None
        return f"{message} (parsed as: gptflow {shlex.join([*path, *argv])})"
    return None


def settings_problem(command: Command) -> str | None:
    """Why the ``--set`` overrides of a ``run``/``rerun`` command do not build a config
    (None: they do, or they are placeholders)."""
    if command.words[0] not in ("run", "rerun") or command.fails:
        return None
    from flows.config import build_config
    from flows.profiles import DEFAULT_PROFILE
    from gpt.errors import ConfigError

    words = list(command.words)
    profile = DEFAULT_PROFILE
    sets = []
    for i, word in enumerate(words[:-1]):
        value = words[i + 1]
        if word == "--profile" and not ALTERNATIVES.match(value) and value not in ELLIPSIS:
            profile = value
        elif word == "--set" and "=" in value and not re.search(r"…|\.\.\.|^stage\.", value):
            sets.append(value)
    if not sets:
        return None
    try:
        build_config(profile, sets)
    except ConfigError as exc:
        return str(exc)
    return None


def query_problem(command: Command, db: Path) -> str | None:
    """Why a ``gptflow sql QUERY`` command fails on an empty catalog of the current
    schema (None: it runs, or its query is a placeholder): a table, view or column the
    docs name that the catalog does not have."""
    from flows.cli import main

    words = [w.split("|")[0] if ALTERNATIVES.match(w) else w for w in command.words]
    if words[0] != "sql" or command.fails or any(PLACEHOLDER.search(w) for w in words):
        return None
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sql", "--db", str(db), *words[1:]])
    return None if code == 0 else err.getvalue().strip()


SETTING = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(=.*)?$")
NEXT_SETTING = re.compile(r"\s+(?:--set\s+)?(?=[a-z_][a-z0-9_]*\.[a-z_][\w.]*=)")
FILE_SUFFIXES = {"py", "toml", "json", "md", "png", "yaml", "txt", "parquet", "duckdb", "log"}
#: Dotted names the docs name as *not* settings ("there is no `catalog.s3` field").
NOT_SETTINGS = {"catalog.s3"}


def setting_problem(path: str) -> str | None:
    """Why ``path`` (``section.field[.field…]``) is no setting of the pipeline's config
    (None: it is one). A mapping field (``placement``) takes any key below it."""
    import typing

    from pydantic import BaseModel

    from flows.config import PipelineConfig

    model: type[BaseModel] = PipelineConfig
    parts = path.split(".")
    for i, name in enumerate(parts):
        field = model.model_fields.get(name)
        if field is None:
            return f"{'.'.join(parts[: i + 1])}: {model.__name__} has no field {name!r}"
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        if any(typing.get_origin(k) is dict or k is dict for k in kinds):
            return None
        models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if i + 1 < len(parts):
            if not models:
                return f"{'.'.join(parts[: i + 1])} is a value, not a section"
            model = models[0]
    return None


def settings_named_in(path: Path, root: Path) -> list[tuple[str, str]]:
    """``(where, dotted setting)`` for every inline code span of a doc that names
    settings (``finetune_spam.pool=last_real``, ``gates.fail_run``, ``--set a.b=1 --set
    c.d=2``) — spans whose first word is a section of the pipeline's config."""
    from flows.config import PipelineConfig

    prose, _ = prose_and_code(path.read_text(encoding="utf-8"))
    found = []
    for m in INLINE_CODE.finditer(prose):
        span = " ".join(m.group(2).split()).removeprefix("--set ")
        where = f"{path.relative_to(root)}:{prose.count(chr(10), 0, m.start()) + 1}"
        for item in NEXT_SETTING.split(span):
            match = SETTING.match(item.strip("'\""))
            if (
                match
                and match.group(1).split(".")[0] in PipelineConfig.model_fields
                and match.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES  # `pretrain.py`
            ):
                found.append((where, match.group(1)))
    return found


def all_commands() -> list[Command]:
    return [c for path in DOC_FILES for c in commands_in(path, REPO)]


# --------------------------------------------------------------------------- the docs
def test_the_docs_exist_and_the_readme_is_short() -> None:
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "architecture.md"} <= names, names
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; guides belong in docs/"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    problems = link_problems(path, REPO)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_gptflow_command_parses() -> None:
    from flows.cli import build_parser

    parser = build_parser()
    commands = all_commands()
    assert len(commands) >= 60, f"only {len(commands)} commands found: the reader is broken"
    problems = [f"{c}\n    {why}" for c in commands if (why := check_command(parser, c))]
    assert not problems, "commands the CLI rejects:\n" + "\n".join(problems)


def test_every_documented_setting_exists() -> None:
    checked = [c for c in all_commands() if c.words and c.words[0] in ("run", "rerun")]
    problems = [f"{c}\n    {why}" for c in checked if (why := settings_problem(c))]
    assert not problems, "settings the config refuses:\n" + "\n".join(problems)


def test_every_setting_named_in_prose_exists() -> None:
    named = [s for path in DOC_FILES for s in settings_named_in(path, REPO)]
    assert len(named) >= 40, f"only {len(named)} settings found: the reader is broken"
    problems = [
        f"{where}: {name}: {why}"
        for where, name in named
        if name not in NOT_SETTINGS and (why := setting_problem(name))
    ]
    assert not problems, "settings that do not exist:\n" + "\n".join(problems)
    assert all(setting_problem(name) for name in NOT_SETTINGS), "a 'not a setting' is one"


def test_every_documented_query_runs(tmp_path: Path) -> None:
    from tasks.catalog import Catalog

    db = tmp_path / "gptflow.duckdb"
    Catalog(db).migrate()
    queries = [c for c in all_commands() if c.words and c.words[0] == "sql" and len(c.words) > 1]
    assert len(queries) >= 15, f"only {len(queries)} queries found"
    problems = [f"{c}\n    {why}" for c in queries if (why := query_problem(c, db))]
    assert not problems, "queries the catalog refuses:\n" + "\n".join(problems)


def test_the_performance_table_is_what_render_makes() -> None:
    """The generated block between the markers is exactly what ``python -m
    benchmarks.render`` makes from the results file the marker names, so rendering a
    newer run and pasting it between the markers replaces it whole."""
    import json

    from benchmarks.render import render

    tables = [p for p in DOC_FILES if "BEGIN PERFORMANCE TABLE" in p.read_text(encoding="utf-8")]
    assert len(tables) == 1, tables
    m = re.search(
        r"<!-- BEGIN PERFORMANCE TABLE: generated by `python -m benchmarks\.render ([^`]+)`"
        r".*?-->\n(.*?)<!-- END PERFORMANCE TABLE -->",
        tables[0].read_text(encoding="utf-8"),
        re.S,
    )
    assert m, f"{tables[0].name}: the markers are not as benchmarks.render's output expects"
    source, block = m.group(1), m.group(2)
    payload = json.loads((REPO / source).read_text(encoding="utf-8"))
    assert block.strip() == render(payload, source).strip()


# --------------------------------------------------------------------------- the checks fail
def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A guide\n\n## `gptflow sql` stays read-only\n\n## Same result, same bytes\n",
        encoding="utf-8",
    )
    page = tmp_path / "README.md"
    page.write_text(
        "See [ok](docs/a.md#gptflow-sql-stays-read-only), [also ok](docs/a.md#same-result-same-bytes),\n"
        "[split\ntext](docs/a.md), [web](https://example.org/x), `[code](nowhere.md)`,\n"
        "[gone](docs/b.md), [bad anchor](docs/a.md#same-result), [out](../elsewhere.md)\n"
        "```\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    problems = link_problems(page, tmp_path)
    assert len(problems) == 3, problems
    assert "docs/b.md: no such file" in problems[0]
    assert "has no heading #same-result" in problems[1]
    assert "outside the repository" in problems[2]


def test_the_command_check_rejects_what_the_cli_does_not_have(tmp_path: Path) -> None:
    from flows.cli import build_parser

    parser = build_parser()
    page = tmp_path / "README.md"
    page.write_text(
        "```bash\n"
        "gptflow run --profile smoke --no-such-flag\n"  # unknown flag
        "gptflow nosuch\n"  # unknown sub-command
        "gptflow compare --format yaml\n"  # a value outside the choices
        "gptflow catalog rebuild --frobnicate\n"  # unknown flag of a sub-sub-command
        "gptflow export CKPT --format hf\n"  # a whole command missing --out
        "gptflow runs RUN --limit 5 | head -3   # fine\n"
        'make run ARGS="--profile smoke --set pretrain.seed=1"\n'  # fine
        "gptflow rerun STAGE [--run RUN | --profile P]\n"  # fine: placeholders
        "gptflow sql … --format table|csv|json\n"  # fine: elided query
        "```\n"
        "Prose may name `gptflow export --format hf` (its required arguments left out), "
        "but not `gptflow judge --modle llama3`; `gptflow CMD: error: …` is a message.\n"
        "```\n$ gptflow bench --quick\ngptflow bench: error: this line is output\n```\n",
        encoding="utf-8",
    )
    commands = commands_in(page, tmp_path)
    rejected = [str(c) for c in commands if check_command(parser, c)]
    assert rejected == [
        "README.md:2: gptflow run --profile smoke --no-such-flag",
        "README.md:3: gptflow nosuch",
        "README.md:4: gptflow compare --format yaml",
        "README.md:5: gptflow catalog rebuild --frobnicate",
        "README.md:6: gptflow export CKPT --format hf",
        "README.md:12: gptflow judge --modle llama3",
    ], rejected
    assert len(commands) == 13, [str(c) for c in commands]


def test_the_setting_names_check_finds_a_renamed_setting(tmp_path: Path) -> None:
    page = tmp_path / "README.md"
    page.write_text(
        "Set `finetune_spam.pool=last_real` (not `spam.pool`), `gates.fail_run`,\n"
        "`placement.pretrain=gpu`, `--set pretrain.seed=1 --set finetune_spam.sed=1` and\n"
        "`judge.host`; `pretrain.model.overrides.drop_rate`, `pretrain.epochs.x`, `pretrain.py`.\n",
        encoding="utf-8",
    )
    named = settings_named_in(page, tmp_path)
    assert [n for _, n in named] == [
        "finetune_spam.pool",
        "gates.fail_run",
        "placement.pretrain",
        "pretrain.seed",
        "finetune_spam.sed",
        "judge.host",
        "pretrain.model.overrides.drop_rate",
        "pretrain.epochs.x",
    ]
    wrong = [n for _, n in named if setting_problem(n)]
    assert wrong == ["finetune_spam.sed", "judge.host", "pretrain.epochs.x"], wrong


def test_the_settings_check_rejects_an_unknown_setting() -> None:
    ok = Command("x", ("run", "--profile", "smoke", "--set", "pretrain.epochs=3"), whole=True)
    bad = Command("x", ("run", "--set", "pretrain.epoch=3"), whole=True)
    typed = Command("x", ("rerun", "judge", "--set", "pretrain.epochs=true"), whole=True)
    assert settings_problem(ok) is None
    assert "pretrain.epoch" in (settings_problem(bad) or "")
    assert "valid integer" in (settings_problem(typed) or "")
