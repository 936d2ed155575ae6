"""Shell commands in Markdown code blocks, and whether each would run as written.

`extract_commands` finds every simple command in ```bash, ```sh and ```shell blocks with the line it
starts on: `\\` continuations joined, `#` comments dropped, split at `&&`, `||`, `;` and `|`, leading
`VAR=value` assignments set aside. `CommandChecker` checks a command's form without running it: the
executable exists (on the given PATH, or as a file relative to the repository); `invoke` tasks and flags
parse with Invoke's own parser against the repository's tasks.py; `nox` arguments and sessions pass
`nox --list`; `python -m M` names an importable module and, where M uses argparse, its `--help` lists
every flag used. Wrappers (`./bootstrap.sh`, `uv run`, `sudo`, `env`) are checked, then what they run.

    python -m dgxready.mdcommands README.md runbooks/*.md
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from invoke import Collection, Program
from invoke.exceptions import ParseError
from invoke.loader import FilesystemLoader
from invoke.parser import Parser, ParseResult

FRESH_LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_LANGUAGES = {"bash", "sh", "shell"}
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>", "<<<"}
BUILTINS = {"cd", "export", "unset", "set", ":", "true", "false", "exit"}
SOURCING = {".", "source"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
HELP_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
TOOL_TIMEOUT_S = 120
MODULE_ORIGIN = """
import importlib.util, sys
try:
    spec = importlib.util.find_spec(sys.argv[1])
    if spec and spec.submodule_search_locations:
        spec = importlib.util.find_spec(sys.argv[1] + ".__main__")
except ImportError:
    spec = None
print(spec.origin if spec and spec.origin else "")
"""


@dataclass(frozen=True)
class Command:
    """One simple command; `line` is where its logical line starts in the Markdown file (1-based)."""
    line: int
    words: tuple[str, ...]
    env: tuple[str, ...] = ()
    syntax_error: str | None = None

    def __str__(self) -> str:
        return shlex.join(self.env + self.words)


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    command: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}\n    {self.command}"


def fenced_blocks(markdown: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the block's first content line, its lines) for every fenced block."""
    language, start, lines = None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if language is None and stripped.startswith("```"):
            info = stripped[3:].split()
            language, start, lines = (info[0].lower() if info else ""), number + 1, []
        elif language is not None and stripped == "```":
            yield language, start, lines
            language = None
        elif language is not None:
            lines.append(line)


def logical_lines(start: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """Lines joined across trailing-backslash continuations, each with the number it starts on."""
    pending: list[str] = []
    first = start
    for offset, line in enumerate(lines):
        if not pending:
            first = start + offset
        text = line.rstrip()
        if text.endswith("\\") and not text.lstrip().startswith("#"):
            pending.append(text[:-1])
            continue
        pending.append(text)
        yield first, " ".join(pending)
        pending = []
    if pending:
        yield first, " ".join(pending)


def split_commands(text: str) -> list[list[str]]:
    """The words of each simple command on a logical line, redirections left out."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirect_target = False
    for token in lexer:
        if token in OPERATORS:
            commands.append([])
        elif token in REDIRECTIONS:
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()
            redirect_target = True
        elif redirect_target:
            redirect_target = False
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def as_command(line: int, words: list[str]) -> Command:
    assignments = list(itertools.takewhile(ASSIGNMENT.match, words))
    return Command(line, tuple(words[len(assignments):]), tuple(assignments))


def extract_commands(markdown: str) -> list[Command]:
    commands = []
    for language, start, lines in fenced_blocks(markdown):
        if language not in SHELL_LANGUAGES:
            continue
        for line, text in logical_lines(start, lines):
            try:
                commands += [as_command(line, words) for words in split_commands(text)]
            except ValueError as exc:
                commands.append(Command(line, (text.strip(),), syntax_error=f"shell syntax: {exc}"))
    return [c for c in commands if c.words or c.syntax_error]


def wrapped_command(program: str, args: list[str]) -> list[str] | None:
    """What a wrapper runs (possibly nothing), or None when `program` is no wrapper."""
    name = Path(program).name
    if name == "bootstrap.sh":
        return args
    if name == "uv" and args[:1] == ["run"]:
        return list(itertools.dropwhile(lambda a: a.startswith("-"), args[1:]))
    if name in ("sudo", "env"):
        return list(itertools.dropwhile(lambda a: a.startswith("-") or ASSIGNMENT.match(a), args))
    return None


def flags_in(args: list[str]) -> list[str]:
    """The options among `args` (before any `--`), without their `=value`."""
    before_dashes = itertools.takewhile(lambda a: a != "--", args)
    return [a.split("=", 1)[0] for a in before_dashes if HELP_FLAG.fullmatch(a.split("=", 1)[0])]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1].removeprefix("nox > ") if lines else "(no output)"


@dataclass
class CommandChecker:
    """Checks commands as a user would type them in `repo` with `search_path` as PATH."""
    repo: Path
    search_path: str
    argument_checkers: dict[str, Callable[[str, list[str]], list[str]]] = field(init=False)

    def __post_init__(self) -> None:
        self.argument_checkers = {"invoke": self.check_invoke, "inv": self.check_invoke,
                                  "nox": self.check_nox, "python": self.check_python,
                                  "python3": self.check_python}

    @functools.cached_property
    def invoke_tasks(self) -> Collection:
        module, _ = FilesystemLoader(start=str(self.repo)).load("tasks")
        return Collection.from_module(module)

    @functools.cached_property
    def invoke_task_flags(self) -> dict[str, set[str]]:
        """Every task name and alias, with the flags Invoke accepts for it (`--no-x` included)."""
        return {name: {*ctx.flags, *ctx.inverse_flags} for ctx in self.invoke_tasks.to_contexts()
                for name in (ctx.name, *ctx.aliases)}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": self.search_path}

    def check(self, command: Command) -> list[str]:
        if command.syntax_error:
            return [command.syntax_error]
        return self.check_words(list(command.words))

    def check_words(self, words: list[str]) -> list[str]:
        program, args = words[0], words[1:]
        if program in SOURCING:
            return [] if args and self.repo_file(args[0]).is_file() else [f"{program}: no file {args[:1]}"]
        if program in BUILTINS:
            return []
        executable = self.executable(program)
        if executable is None:
            return [f"{program}: command not found (PATH={self.search_path}, cwd {self.repo})"]
        inner = wrapped_command(program, args)
        if inner is not None:
            return self.check_words(inner) if inner else []
        checker = self.argument_checkers.get(Path(program).name)
        return checker(executable, args) if checker else []

    def repo_file(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.repo / path

    def executable(self, program: str) -> str | None:
        if "/" in program:
            path = self.repo_file(program)
            return str(path) if path.is_file() and os.access(path, os.X_OK) else None
        return shutil.which(program, path=self.search_path)

    def parse_invoke(self, args: list[str]) -> tuple[ParseResult, ParseResult]:
        """Core options, then tasks, parsed the way `invoke.Program` parses them."""
        core = Parser(initial=Program().initial_context, ignore_unknown=True).parse_argv(args)
        return core, Parser(contexts=self.invoke_tasks.to_contexts()).parse_argv(core.unparsed)

    def check_invoke(self, executable: str, args: list[str]) -> list[str]:
        try:
            core, tasks = self.parse_invoke(args)
        except (ParseError, ValueError) as exc:
            return [f"invoke: {exc}"]
        topic = core[0].args["help"].value
        if isinstance(topic, str) and topic not in self.invoke_task_flags:
            return [f"invoke: --help {topic}: no such task"]
        # Invoke fills a task's positional arguments before it looks at flags, so an unknown flag given
        # where a positional is expected arrives as that positional's value.
        return [f"invoke {ctx.name}: no flag {arg.value}" for ctx in tasks for arg in ctx.positional_args
                if isinstance(arg.value, str) and arg.value.startswith("-")]

    def run_tool(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)

    def check_nox(self, executable: str, args: list[str]) -> list[str]:
        dashes = args.index("--") if "--" in args else len(args)
        listed = self.run_tool([executable, *args[:dashes], "--list", *args[dashes:]])
        return [f"nox: {last_line(listed.stderr or listed.stdout)}"] if listed.returncode else []

    def check_python(self, executable: str, args: list[str]) -> list[str]:
        if args[:1] == ["-m"] and len(args) > 1:
            return self.check_python_module(executable, args[1], args[2:])
        if args and not args[0].startswith("-") and not self.repo_file(args[0]).is_file():
            return [f"python: no script {args[0]}"]
        return []

    def module_origin(self, python: str, module: str) -> str:
        return self.run_tool([python, "-c", MODULE_ORIGIN, module]).stdout.strip()

    def check_python_module(self, python: str, module: str, args: list[str]) -> list[str]:
        origin = self.module_origin(python, module)
        if not origin:
            return [f"python -m {module}: no module named {module}"]
        if "argparse" not in Path(origin).read_text(errors="replace"):
            return []
        positionals = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
        shown = self.run_tool([python, "-m", module, *positionals, "--help"])
        if shown.returncode:
            return [f"python -m {module} --help failed: {last_line(shown.stderr or shown.stdout)}"]
        known = set(HELP_FLAG.findall(shown.stdout))
        return [f"python -m {module}: no flag {flag} in its --help" for flag in flags_in(args)
                if flag not in known]


def activated_path(repo: Path) -> str:
    """PATH in a fresh login shell after `. .venv/bin/activate`."""
    return f"{repo / '.venv' / 'bin'}{os.pathsep}{FRESH_LOGIN_PATH}"


def check_markdown(path: Path, checker: CommandChecker) -> list[Problem]:
    return [Problem(str(path), cmd.line, str(cmd), message)
            for cmd in extract_commands(path.read_text()) for message in checker.check(cmd)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the shell commands in Markdown code blocks.")
    parser.add_argument("files", nargs="+", type=Path, help="Markdown files")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="where the commands run")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    checker = CommandChecker(repo, activated_path(repo))
    problems = [p for path in args.files for p in check_markdown(path, checker)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
