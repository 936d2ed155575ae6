"""shell.run's two layers. An allowlist of argv patterns decides what may run; a bubblewrap
sandbox decides what a running command can see: a read-only copy of the workspace files it
names, the system's /usr, a fresh /proc and /dev, no network, a clean environment, rlimits, a
wall-time limit and an output cap.

Pattern language: a pattern is a list of words. The first is a program name, looked up on the
sandbox's PATH. Each later word matches one argument: a literal, or a literal prefix followed by a
placeholder, optionally ending in `?` (zero or one), `*` (any number) or `+` (one or more).
Placeholders: `<path>` a workspace-relative path (letters, digits, ._-/, no `..`, not absolute),
`<any>` any text that does not start with `-`, `<int>` a decimal number. Examples:
`[wc, -l, <path>+]`, `[date, +<any>?]`, `[ls, <path>*]`, `[echo, <any>*]`."""
from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$")
PROGRAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
WORD_RE = re.compile(r"^(?P<prefix>[^<>]*?)(?:<(?P<kind>[a-z]+)>)?(?P<quantifier>[?*+]?)$")
INT_RE = re.compile(r"^[0-9]{1,9}$")
PLACEHOLDERS = ("path", "any", "int")
MAX_PATTERN_WORDS = 16
MAX_ARGS = 64

DEFAULT_SHELL_ALLOWLIST: tuple[tuple[str, ...], ...] = (
    ("true",),
    ("echo", "<any>*"),
    ("date", "-u?", "+<any>?"),
    ("uname", "-a?"), ("uname", "-s"), ("uname", "-r"), ("uname", "-m"),
    ("wc", "-l?", "<path>+"), ("wc", "-w", "<path>+"), ("wc", "-c", "<path>+"),
    ("ls", "-l?", "<path>*"),
)

SANDBOX_UID = 65534
SANDBOX_PATH = "/usr/bin:/bin"
SANDBOX_ENV = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"}
WORKDIR = "/work"


def is_workspace_path(text: str) -> bool:
    return bool(PATH_RE.match(text)) and ".." not in text.split("/")


@dataclass(frozen=True)
class ArgWord:
    """One word of a pattern after the program: a literal prefix, then maybe a placeholder."""
    prefix: str
    kind: str | None
    quantifier: str

    @classmethod
    def parse(cls, word: str) -> ArgWord:
        m = WORD_RE.match(word)
        if not m:
            raise ValueError(f"{word!r}: '<' and '>' only surround a placeholder "
                             f"(<{'>, <'.join(PLACEHOLDERS)}>)")
        prefix, kind, quantifier = m["prefix"], m["kind"], m["quantifier"]
        if kind is not None and kind not in PLACEHOLDERS:
            raise ValueError(f"{word!r}: unknown placeholder <{kind}>; use <{'>, <'.join(PLACEHOLDERS)}>")
        if not prefix and kind is None:
            raise ValueError(f"{word!r}: an empty word matches nothing")
        if kind == "any" and prefix in ("-", "--"):
            raise ValueError(f"{word!r}: would let any option through; spell the options out")
        return cls(prefix, kind, quantifier)

    def matches(self, arg: str) -> bool:
        if self.kind is None:
            return arg == self.prefix
        if not arg.startswith(self.prefix):
            return False
        rest = arg[len(self.prefix):]
        if self.kind == "path":
            return is_workspace_path(rest)
        if self.kind == "int":
            return bool(INT_RE.match(rest))
        return not rest.startswith("-")

    @property
    def optional(self) -> bool:
        return self.quantifier in ("?", "*")

    @property
    def repeats(self) -> bool:
        return self.quantifier in ("*", "+")


@dataclass(frozen=True)
class ArgvMatch:
    """The workspace paths a matched command names, and whether its pattern takes paths at all
    (a command that could take paths but was given none works on the whole workspace)."""
    paths: tuple[str, ...]
    takes_paths: bool


@dataclass(frozen=True)
class ArgvPattern:
    program: str
    words: tuple[ArgWord, ...]

    @classmethod
    def parse(cls, words: Sequence[str]) -> ArgvPattern:
        if not words:
            raise ValueError("an empty pattern matches nothing; give the program first")
        if len(words) > MAX_PATTERN_WORDS:
            raise ValueError(f"{len(words)} words; a pattern has at most {MAX_PATTERN_WORDS}")
        if not all(isinstance(w, str) for w in words):
            raise ValueError("every word must be a string")
        if not PROGRAM_RE.match(words[0]):
            raise ValueError(f"{words[0]!r}: the first word is a program name (no path, placeholder "
                             "or quantifier)")
        return cls(words[0], tuple(ArgWord.parse(w) for w in words[1:]))

    def match(self, argv: Sequence[str]) -> ArgvMatch | None:
        if not argv or argv[0] != self.program:
            return None
        paths = _align(self.words, tuple(argv[1:]), 0, 0, set())
        if paths is None:
            return None
        return ArgvMatch(paths, any(w.kind == "path" for w in self.words))


def _align(words: tuple[ArgWord, ...], args: tuple[str, ...], w: int, a: int,
           failed: set[tuple[int, int]]) -> tuple[str, ...] | None:
    """The <path> arguments of the first alignment of args[a:] with words[w:], or None."""
    if (w, a) in failed:
        return None
    if w == len(words):
        return () if a == len(args) else None
    word = words[w]
    if a < len(args) and word.matches(args[a]):
        found = _align(words, args, w if word.repeats else w + 1, a + 1, failed)
        if found is None and word.repeats:
            found = _align(words, args, w + 1, a + 1, failed)
        if found is not None:
            return ((args[a][len(word.prefix):],) if word.kind == "path" else ()) + found
    found = _align(words, args, w + 1, a, failed) if word.optional else None
    if found is None:
        failed.add((w, a))
    return found


def check_pattern(words: list[str]) -> list[str]:
    """Validate one allowlist entry at config load; ValueError says what is wrong."""
    ArgvPattern.parse(words)
    return words


def refuse_bare_program(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f"{value!r}: a bare program name would allow any argument; give an argv "
                         f"pattern such as [{value}, <path>]")
    return value


class SandboxError(Exception):
    """The sandbox cannot run the command: bubblewrap is missing or broken here, or the command's
    workspace files are too large."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    output_bytes: int = 64 * 1024
    cpu_s: int = 5
    memory_bytes: int = 256 << 20
    processes: int = 32
    open_files: int = 64
    workspace_bytes: int = 64 << 20


@dataclass(frozen=True)
class SandboxResult:
    exit: int
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool


@dataclass
class Output:
    """What a command wrote, up to a shared cap for stdout and stderr together."""
    cap: int
    stdout: bytearray
    stderr: bytearray
    truncated: bool = False

    def take(self, stream: bytearray, chunk: bytes) -> None:
        room = self.cap - len(self.stdout) - len(self.stderr)
        stream += chunk[:room]
        if len(chunk) > room:
            self.truncated = True


def system_binds() -> list[str]:
    """/usr read-only with the binaries and libraries only, and /bin, /lib, /lib64 as they are on
    the host (symlinks on a merged-/usr system)."""
    args = ["--ro-bind", "/usr/bin", "/usr/bin", "--ro-bind", "/usr/lib", "/usr/lib",
            "--ro-bind-try", "/usr/lib64", "/usr/lib64"]
    for name in ("bin", "lib", "lib64"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def rlimit_prefix(prlimit: str, limits: SandboxLimits) -> list[str]:
    # Applied inside the sandbox's user namespace, so the process count is the sandbox's own.
    return [prlimit, f"--nproc={limits.processes}", f"--as={limits.memory_bytes}",
            f"--cpu={limits.cpu_s}", f"--nofile={limits.open_files}", "--fsize=0", "--core=0", "--"]


def bwrap_argv(bwrap: str, workdir: Path) -> list[str]:
    env = [arg for key, value in SANDBOX_ENV.items() for arg in ("--setenv", key, value)]
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", *env, "--hostname", "sandbox", *system_binds(),
            "--proc", "/proc", "--dev", "/dev", "--ro-bind", str(workdir), WORKDIR, "--chdir", WORKDIR]


def materialise(root: Path, files: Mapping[str, str], limit: int) -> None:
    size = 0
    for path, content in sorted(files.items()):
        data = content.encode()
        size += len(data)
        if size > limit:
            raise SandboxError(f"the workspace files for this command exceed {limit} bytes")
        target = root / path
        if not is_workspace_path(path) or not target.resolve().is_relative_to(root):
            continue
        # A workspace may hold both "a" and "a/b"; the one written second cannot exist on disk.
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue
    # Readable by the sandbox's user whatever the multiplexer's umask.
    for entry in root.rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)


class Sandbox:
    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self._checked = False

    def run(self, argv: Sequence[str], files: Mapping[str, str]) -> SandboxResult:
        bwrap, prlimit = self._tools()
        root = Path(tempfile.mkdtemp(prefix="dgxready-shell-")).resolve()
        try:
            materialise(root, files, self.limits.workspace_bytes)
            if os.geteuid() == 0:
                os.chown(root, SANDBOX_UID, SANDBOX_UID)
            return self._spawn([*bwrap_argv(bwrap, root), *rlimit_prefix(prlimit, self.limits), *argv])
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _tools(self) -> tuple[str, str]:
        bwrap, prlimit = shutil.which("bwrap"), shutil.which("prlimit")
        if not bwrap:
            raise SandboxError("bubblewrap (bwrap) is not on the multiplexer's PATH; commands run only "
                               "in its sandbox: apt-get install bubblewrap")
        if not prlimit or not prlimit.startswith("/usr/"):
            raise SandboxError("prlimit (util-linux) is not under /usr on the multiplexer's PATH")
        if not self._checked:
            self._probe(bwrap)
        return bwrap, prlimit

    def _probe(self, bwrap: str) -> None:
        root = Path(tempfile.mkdtemp(prefix="dgxready-shell-")).resolve()
        try:
            if os.geteuid() == 0:
                os.chown(root, SANDBOX_UID, SANDBOX_UID)
            probe = self._spawn([*bwrap_argv(bwrap, root), "true"])
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if probe.exit != 0:
            raise SandboxError(f"bwrap cannot build a sandbox here (exit {probe.exit}): "
                                     f"{probe.stderr.strip()[:500]}")
        self._checked = True

    def _spawn(self, argv: list[str]) -> SandboxResult:
        root = os.geteuid() == 0
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=SANDBOX_ENV, cwd="/",
                                    start_new_session=True, close_fds=True,
                                    user=SANDBOX_UID if root else None, group=SANDBOX_UID if root else None,
                                    extra_groups=[] if root else None)
        except OSError as exc:
            raise SandboxError(f"cannot start {argv[0]}: {exc.strerror}") from None
        with proc:
            try:
                output, timed_out = self._collect(proc)
            finally:
                # Not reaped yet, so the group id is still this one's. The sandbox's init dies with
                # bwrap and takes everything in its pid namespace with it.
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        return SandboxResult(proc.returncode, output.stdout.decode(errors="replace"),
                             output.stderr.decode(errors="replace"), output.truncated, timed_out)

    def _collect(self, proc: subprocess.Popen) -> tuple[Output, bool]:
        """Read both pipes until they close, the output cap is reached or the wall time runs out."""
        output = Output(self.limits.output_bytes, bytearray(), bytearray())
        deadline = time.monotonic() + self.limits.wall_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, output.stdout)
            sel.register(proc.stderr, selectors.EVENT_READ, output.stderr)
            while sel.get_map() and not output.truncated:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return output, True
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        output.take(key.data, chunk)
                    else:
                        sel.unregister(key.fileobj)
        if output.truncated:
            return output, False
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return output, True
        return output, False
