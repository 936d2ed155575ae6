"""Shell commands in Markdown code blocks, and whether each would run as written.

`extract_commands` finds every simple command in ```bash, ```sh and ```shell blocks with the line it
starts on: `\\` continuations joined, `#` comments dropped, split at `&&`, `||`, `;` and `|`, leading
`VAR=value` assignments set aside. `CommandChecker` checks a command's form without running it: the
executable exists (on the given PATH, or as a file relative to the repository); `invoke` tasks and flags
parse with Invoke's own parser against the repository's tasks.py; `nox` arguments and sessions pass
`nox --list`; `python -m M` names an importable module and, where M uses argparse, its `--help` lists
every flag used; a repository path among the arguments (`bench/profiles.yaml`, `bash repro/run.sh`)
exists. Wrappers (`./bootstrap.sh`, `uv run`, `sudo`, `env`) are checked, then what they run.

Commands for another machine: a block whose first line is a comment `# on WHERE` (`# on the DGX`,
`# on spark-1 and spark-2`) runs there, so a program missing here is accepted when it is one of
HOST_PROGRAMS (nvidia-smi, ray, vllm, ...), with the flags HOST_FLAGS knows for its subcommand; any
other missing program is still an error, and the rest of the check (invoke, paths) still applies.
A host program in an unmarked block is an error that says to mark it.

`CommandRunner` runs the commands that can run here as written: `invoke --help TASK`, `invoke --list`,
the side-effect-free tasks in RUN_HERE_TASKS (in this process, through Invoke's own Program, with
files a task would write sent to a scratch folder) and `promtool check`; never a command with a
placeholder (`NAME`, `<file>`, `...`) or one for another machine.

    python -m dgxready.mdcommands README.md runbooks/*.md [--run]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
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
HOST_MARKER = re.compile(r"^#\s*on\s+(?P<where>\S.*?)\s*$")
# Programs that run on the hosts the runbooks set up, not on the controller: accepted only in a block
# marked `# on WHERE`. Each entry says where it comes from.
HOST_PROGRAMS = {
    "nvidia-smi": "the NVIDIA driver (DGX OS ships it)",
    "dcgmi": "NVIDIA DCGM (datacenter-gpu-manager), optional on GB10",
    "nvbandwidth": "NVIDIA's nvbandwidth, built from its sources",
    "vllm": "vLLM, in the NGC image or a venv on the host",
    "ray": "Ray, in the NGC vLLM image or the host's vLLM venv",
    "ibdev2netdev": "the ConnectX driver tools (DGX OS ships them)",
    "netplan": "Ubuntu's network configuration (DGX OS)",
    "ethtool": "ethtool (Ubuntu)",
    "iperf3": "iperf3 (Ubuntu package)",
    "ping": "iputils-ping",
    "hostnamectl": "systemd (DGX OS)",
    "apt": "apt (DGX OS is Ubuntu)",
    "sudo": "sudo (a wrapper: what it runs is checked)",
}
# The flags a host program's subcommand accepts, where a runbook uses them; from their documentation:
# vLLM's `vllm serve --help` (docs.vllm.ai, serving/parallelism_scaling.md), Ray's `ray start --help`.
HOST_FLAGS: dict[tuple[str, str], frozenset[str]] = {
    ("vllm", "serve"): frozenset({
        "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp", "--pipeline-parallel-size",
        "-pp", "--distributed-executor-backend", "--max-num-seqs", "--max-model-len", "--kv-cache-dtype",
        "--gpu-memory-utilization", "--enable-prefix-caching", "--no-enable-prefix-caching",
        "--scheduling-policy", "--tokenizer-mode", "--api-key", "--quantization", "--dtype",
        "--speculative-config", "--enforce-eager"}),
    ("ray", "start"): frozenset({
        "--head", "--address", "--port", "--node-ip-address", "--num-gpus", "--num-cpus",
        "--dashboard-host", "--dashboard-port", "--block", "--disable-usage-stats"}),
    ("ray", "status"): frozenset({"--address"}),
    ("ray", "stop"): frozenset({"--force"}),
    ("nvidia-smi", ""): frozenset({"-L", "-q", "-d", "-i", "--query-gpu", "--format", "--query-compute-apps"}),
}
# Arguments that name where a command writes, not what it reads: such a path need not exist yet.
OUTPUT_FLAGS = {"-o", "--output", "--output-dir", "--out"}
# A word the reader replaces: <file>, ..., $VAR, a glob, or an upper-case name without digits, alone
# or in a path (NAME, bench/baselines/HOST/BEFORE.json; Q4_K_M is a value).
PLACEHOLDER = re.compile(r"<[^<>]*>|\.\.\.|…|\$|\*|(?<![A-Za-z0-9_])[A-Z][A-Z_]{2,}(?![A-Za-z0-9_])|^[A-Z]$")
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
    host: str | None = None  # where it runs, from its block's `# on WHERE` line; None: here

    @property
    def has_placeholder(self) -> bool:
        """A word a reader replaces (`NAME`, `<file>`, `...`, `$VAR`): the command cannot run as written."""
        return any(PLACEHOLDER.search(w) for w in self.words + tuple(e.split("=", 1)[1] for e in self.env))

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


def as_command(line: int, words: list[str], host: str | None = None) -> Command:
    assignments = list(itertools.takewhile(ASSIGNMENT.match, words))
    return Command(line, tuple(words[len(assignments):]), tuple(assignments), host=host)


def block_host(lines: list[str]) -> str | None:
    """WHERE from a block whose first non-blank line is `# on WHERE`, else None (it runs here)."""
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    match = HOST_MARKER.match(first)
    return match["where"] if match else None


def extract_commands(markdown: str) -> list[Command]:
    commands = []
    for language, start, lines in fenced_blocks(markdown):
        if language not in SHELL_LANGUAGES:
            continue
        host = block_host(lines)
        for line, text in logical_lines(start, lines):
            try:
                commands += [as_command(line, words, host) for words in split_commands(text)]
            except ValueError as exc:
                commands.append(Command(line, (text.strip(),), syntax_error=f"shell syntax: {exc}", host=host))
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
        return self.check_words(list(command.words), command.host)

    def check_words(self, words: list[str], host: str | None = None) -> list[str]:
        program, args = words[0], words[1:]
        if program in SOURCING:
            return [] if args and self.repo_file(args[0]).is_file() else [f"{program}: no file {args[:1]}"]
        if program in BUILTINS:
            return []
        executable = self.executable(program)
        if executable is None:
            if host and program in HOST_PROGRAMS:
                inner = wrapped_command(program, args)
                if inner is not None:
                    return self.check_words(inner, host) if inner else []
                return self.check_host_flags(program, args) + self.missing_repo_paths(args)
            where = (f"; it runs on another machine ({HOST_PROGRAMS[program]}): start its block with "
                     "`# on WHERE`" if program in HOST_PROGRAMS and not host else "")
            return [f"{program}: command not found (PATH={self.search_path}, cwd {self.repo}){where}"]
        inner = wrapped_command(program, args)
        if inner is not None:
            return self.check_words(inner, host) if inner else []
        checker = self.argument_checkers.get(Path(program).name)
        return (checker(executable, args) if checker else []) + self.missing_repo_paths(args)

    def check_host_flags(self, program: str, args: list[str]) -> list[str]:
        sub = args[0] if args and not args[0].startswith("-") else ""
        known = HOST_FLAGS.get((program, sub))
        if known is None:
            return []
        return [f"{program} {sub}: flag {flag} is not among those its documentation gives (HOST_FLAGS)".replace(
                "  ", " ") for flag in flags_in(args) if flag not in known]

    def missing_repo_paths(self, args: list[str]) -> list[str]:
        """A relative path under one of the repository's own folders (`monitoring/prometheus/rules.yml`)
        must exist, unless it is where the command writes or a placeholder."""
        problems = []
        for previous, arg in itertools.pairwise(["", *args]):
            flag, _, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
            if not value or PLACEHOLDER.search(value) or (previous if not flag else flag) in OUTPUT_FLAGS:
                continue
            path = Path(value)
            if path.is_absolute() or len(path.parts) < 2 or path.parts[0] in ("..", "."):
                continue
            if (self.repo / path.parts[0]).is_dir() and not (self.repo / path).exists():
                problems.append(f"no such path in the repository: {value}")
        return problems

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


# Tasks that only read and compute, fast enough to run on every check; each with the flag that
# sends the files it writes elsewhere (to the runner's scratch folder).
RUN_HERE_TASKS: dict[str, str | None] = {"bench.predict": "--output-dir", "model.plan": None,
                                         "model.list": None}
RUN_HERE_PROGRAMS = {("promtool", "check")}


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """contextlib.chdir, which Python 3.10 lacks."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass(frozen=True)
class RunResult:
    command: Command
    argv: tuple[str, ...]
    code: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class CommandRunner:
    """Runs, as written, the commands that can run on this machine (see the module's docstring)."""
    checker: CommandChecker
    scratch: Path
    tasks: dict[str, str | None] = field(default_factory=lambda: dict(RUN_HERE_TASKS))

    def runnable(self, command: Command) -> bool:
        if command.host or command.syntax_error or command.has_placeholder or command.env:
            return False
        program, args = command.words[0], list(command.words[1:])
        if program in ("invoke", "inv"):
            core, tasks = self.checker.parse_invoke(args)
            if not tasks:
                return bool(core[0].args["help"].value or core[0].args["list"].value)
            return all(ctx.name in self.tasks for ctx in tasks)
        return (program, args[0] if args else "") in RUN_HERE_PROGRAMS

    def run(self, command: Command) -> RunResult:
        started = time.perf_counter()
        if command.words[0] in ("invoke", "inv"):
            argv, code, output = self.run_invoke(list(command.words[1:]))
        else:
            argv = command.words
            done = self.checker.run_tool(list(argv))
            code, output = done.returncode, done.stdout + done.stderr
        return RunResult(command, tuple(argv), code, output, time.perf_counter() - started)

    def run_invoke(self, args: list[str]) -> tuple[tuple[str, ...], int, str]:
        """Through Invoke's own Program with the repository's collection, in this process (loading
        tasks.py once instead of once a command), with the repository as the working directory."""
        _, tasks = self.checker.parse_invoke(args)
        for ctx in tasks:
            flag = self.tasks.get(ctx.name)
            if flag and not any(a == flag or a.startswith(flag + "=") for a in args):
                args += [flag, str(self.scratch)]
        argv = ("invoke", *args)
        buffer = io.StringIO()
        code = 0
        with working_directory(self.checker.repo), contextlib.redirect_stdout(buffer), \
                contextlib.redirect_stderr(buffer):
            try:
                Program(namespace=self.checker.invoke_tasks, name="invoke", binary="invoke").run(list(argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - a crash is this command's result, reported with its traceback
                code = 1
                buffer.write(traceback.format_exc())
        return argv, code, buffer.getvalue()


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
    parser.add_argument("--run", action="store_true", help="also run the commands that can run here")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    checker = CommandChecker(repo, activated_path(repo))
    problems = [p for path in args.files for p in check_markdown(path, checker)]
    if args.run and not problems:
        with tempfile.TemporaryDirectory(prefix="mdcommands-") as scratch:
            runner = CommandRunner(checker, Path(scratch))
            for path in args.files:
                for cmd in filter(runner.runnable, extract_commands(path.read_text())):
                    result = runner.run(cmd)
                    print(f"{path}:{cmd.line}: exit {result.code} in {result.seconds:.1f} s: {cmd}")
                    if not result.ok:
                        problems.append(Problem(str(path), cmd.line, str(cmd),
                                                f"exit {result.code}: {last_line(result.output)}"))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
