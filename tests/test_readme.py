"""README.md's commands run as written on a fresh clone after the two quickstart commands, which leave
.venv in place; the README then says to activate it, so .venv/bin leads a fresh login shell's PATH."""
import re

import pytest

from dgxready.mdcommands import CommandChecker, Problem, activated_path, check_markdown, extract_commands
from dgxready.settings import REPO_ROOT

README = REPO_ROOT / "README.md"
PLANTED = """# Planted

Some prose with `invoke nosuch` inline, which is not a code block.

```bash
invoke nosuch.task                          # line 6: unknown task
invoke model.pull smollm2-135m --nope       # line 7: unknown flag
invoke model.pull --nope                    # line 8: unknown flag where the name belongs
invoke provision.check --host dgx \\
    --dry-run                               # line 9: a flag of another task, over two lines
no-such-tool --version                      # line 11: missing executable
./no-such-script.sh && nox -s nosuch        # line 12: missing script, unknown session
python -m no_such_module                    # line 13
python -m dgxready.mdcommands --nope x.md   # line 14: argparse flag not in --help
invoke model.list | grep smollm             # line 15: fine
```
"""


@pytest.fixture(scope="module")
def checker():
    return CommandChecker(REPO_ROOT, activated_path(REPO_ROOT))


def problems_in(markdown: str, checker: CommandChecker, tmp_path) -> list[Problem]:
    path = tmp_path / "planted.md"
    path.write_text(markdown)
    return check_markdown(path, checker)


def tasks_table_lines(markdown: str) -> list[tuple[int, str]]:
    """(index, line) for the lines of the Tasks section up to its first table's end, from the table on."""
    section = markdown.split("\n## Tasks\n", 1)[1].split("\n#", 1)[0].splitlines()
    first = next(i for i, line in enumerate(section) if line.startswith("|"))
    last = max(i for i, line in enumerate(section) if line.startswith("|"))
    return list(enumerate(section))[first:last + 1]


def test_every_shell_command_in_the_readme_runs_as_written_after_the_quickstart(checker):
    problems = check_markdown(README, checker)
    assert problems == [], "\n".join(map(str, problems))


def test_the_readme_activates_the_environment_before_any_command_that_needs_it():
    commands = extract_commands(README.read_text())
    bootstrapped = [c for c in commands if c.words[0] == "./bootstrap.sh"]
    assert commands[:len(bootstrapped)] == bootstrapped and len(bootstrapped) == 2
    assert commands[2].words == (".", ".venv/bin/activate")


def test_commands_are_split_at_continuations_comments_env_prefixes_and_operators():
    markdown = ("text\n```bash\n"
                "HF_TOKEN=x A=1 invoke model.pull \\\n  m --format fp8   # a comment\n"
                "# only a comment \\\n"
                "cd /tmp && ls -l | grep 'a # b' > out.txt 2>&1; echo done\n"
                "```\n```python\nprint('not shell')\n```\n")
    commands = [(c.line, c.env, c.words) for c in extract_commands(markdown)]
    assert commands == [
        (3, ("HF_TOKEN=x", "A=1"), ("invoke", "model.pull", "m", "--format", "fp8")),
        (6, (), ("cd", "/tmp")), (6, (), ("ls", "-l")), (6, (), ("grep", "a # b")), (6, (), ("echo", "done"))]


def test_planted_bad_commands_are_reported_with_their_line(checker, tmp_path):
    found = [(p.line, p.message) for p in problems_in(PLANTED, checker, tmp_path)]
    expected = [
        (6, "invoke: No idea what 'nosuch.task' is!"),
        (7, "invoke: No idea what '--nope' is!"),
        (8, "invoke model.pull: no flag --nope"),
        (9, "invoke: No idea what '--dry-run' is!"),
        (11, "no-such-tool: command not found"),
        (12, "./no-such-script.sh: command not found"),
        (12, "nox: Sessions not found: nosuch"),
        (13, "python -m no_such_module: no module named no_such_module"),
        (14, "python -m dgxready.mdcommands: no flag --nope in its --help"),
    ]
    assert len(found) == len(expected), found
    for (line, message), (want_line, want_message) in zip(found, expected, strict=True):
        assert line == want_line and message.startswith(want_message), (line, message)


def test_an_unclosed_quote_is_reported_not_raised(checker, tmp_path):
    problems = problems_in("```bash\necho 'unclosed\n```\n", checker, tmp_path)
    assert [(p.line, p.message) for p in problems] == [(2, "shell syntax: No closing quotation")]


def test_invoke_flags_follow_the_task_signature(checker):
    # provision's `from_` parameter is --from; a bool that defaults to False has no --no- form.
    assert {"--from", "--dry-run", "--yes"} <= checker.invoke_task_flags["provision"]
    assert "--no-yes" not in checker.invoke_task_flags["provision"]
    assert checker.check_words(["invoke", "provision", "--host", "dgx", "--from", "model"]) == []
    assert checker.check_words(["invoke", "--help", "model.serve"]) == []
    assert checker.check_words(["invoke", "--help", "model.nope"]) == [
        "invoke: --help model.nope: no such task"]


def test_the_tasks_table_is_one_table_whose_tasks_and_flags_exist(checker):
    lines = tasks_table_lines(README.read_text())
    assert [text for _, text in lines if not text.startswith("|")] == [], "a line breaks the tasks table"
    unknown = []
    for _, row in lines[2:]:
        first_cell = re.split(r"(?<!\\)\|", row)[1]
        for usage in re.findall(r"`([^`]+)`", first_cell):
            task, flags = usage.split()[0], re.findall(r"--[\w-]+", usage)
            known = checker.invoke_task_flags.get(task)
            unknown += [usage] if known is None else [f"{task} {f}" for f in flags if f not in known]
    assert unknown == []
