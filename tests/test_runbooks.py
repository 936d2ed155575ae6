"""Every runbook's commands are real: the shell commands in its code blocks pass the README's check
(dgxready.mdcommands: executables, invoke tasks and flags, nox sessions, python modules, repository
paths), with blocks marked `# on WHERE` for commands that run on another machine; the commands that
can run here run as written; PromQL parses and names metrics that exist; inventory and multiplexer
YAML validates against their schemas; dashboards and panels named in bold exist; links and anchors
resolve. runbooks/README.md says so to the reader."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agents.config import load_config
from dgxready.mdcommands import (
    CommandChecker,
    CommandRunner,
    activated_path,
    check_markdown,
    extract_commands,
    fenced_blocks,
)
from dgxready.settings import REPO_ROOT
from monitoring.dashboards import definitions
from monitoring.prometheus.rules import rule_set
from provision.inventory import load_inventory

RUNBOOKS_DIR = REPO_ROOT / "runbooks"
RUNBOOKS = sorted(RUNBOOKS_DIR.glob("*.md"))
# The runbooks this test was written with; every runbook in the folder is checked all the same.
WRITTEN_WITH = ("dgx-spark.md", "troubleshooting.md", "performance.md", "README.md")
LANGUAGES = {"bash", "yaml", "promql", "text", "json", "python"}
YAML_SCHEMAS = {"inventory.yaml": load_inventory, "agents/multiplexer.yaml": load_config}
METRIC = re.compile(r"(?<![\w/.-])(dgxready[_:][A-Za-z0-9_:]+|vllm:[a-z_][a-z0-9_]*|llamacpp:[a-z_][a-z0-9_]*"
                    r"|DCGM_FI_[A-Z0-9_]+|node_[a-z0-9_]+)")
METRIC_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")
# Where the metric names the runbooks may use are defined: the multiplexer, the exporter, the rules
# (recording rules, and the engines' and exporters' names the alerts use) and the dashboards.
METRIC_SOURCES = ("agents/metrics.py", "monitoring/exporter.py", "monitoring/prometheus/rules.py",
                  "monitoring/dashboards/definitions.py", "monitoring/prometheus/rules_test.yml")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
BOLD = re.compile(r"\*\*([^*]+)\*\*(:?)")
PLOTS_WRITTEN = re.compile(r'figures\["(\w+)"\]')
RUN_BUDGET_S = 60


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def checker() -> CommandChecker:
    return CommandChecker(REPO_ROOT, activated_path(REPO_ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose(markdown: str) -> str:
    """The Markdown without its fenced blocks (whose `**` or links are code, not text)."""
    return re.sub(r"^\s*```.*?^\s*```", "", markdown, flags=re.S | re.M)


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=ids(RUNBOOKS))
def test_every_shell_command_is_real(runbook, checker):
    problems = check_markdown(runbook, checker)
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=ids(RUNBOOKS))
def test_code_blocks_name_a_checked_language(runbook):
    """No unlabelled or `console` block slips past the check: shell is `bash`, and host-only commands
    are marked inside it with `# on WHERE`."""
    if runbook.name not in WRITTEN_WITH:
        pytest.skip(f"{runbook.name} is kept by its own issue; its bash blocks are checked above")
    languages = [(start, lang) for lang, start, _ in fenced_blocks(runbook.read_text())]
    assert [(start, lang) for start, lang in languages if lang not in LANGUAGES] == []


def test_the_commands_that_can_run_here_run_as_written(checker, tmp_path):
    """invoke --help/--list, bench.predict, model.plan, model.list and promtool check, as the runbooks
    write them; model.plan may refuse on this machine's memory ("does not fit"), which is its answer
    for this host, not a broken command."""
    runner = CommandRunner(checker, tmp_path)
    ran, lines, failed = [], [], []
    started = time.perf_counter()
    for runbook in RUNBOOKS:
        for cmd in filter(runner.runnable, extract_commands(runbook.read_text())):
            if cmd.words in ran:  # the same command in two places runs once
                continue
            result = runner.run(cmd)
            ran.append(cmd.words)
            lines.append(f"{runbook.name}:{cmd.line} {result.seconds:.1f}s {cmd}")
            refused = cmd.words[1:2] == ("model.plan",) and "does not fit" in result.output
            if not (result.ok or refused):
                failed.append(f"{runbook.name}:{cmd.line}: exit {result.code}: {cmd}\n{result.output[-2000:]}")
    elapsed = time.perf_counter() - started
    print(f"ran {len(ran)} commands in {elapsed:.1f} s:\n" + "\n".join(lines))
    assert failed == [], "\n".join(failed)
    assert {"bench.predict", "model.plan", "model.list", "--help"} <= {w[1] for w in ran if w[0] == "invoke"}
    assert ("promtool", "check", "rules") in {w[:3] for w in ran}
    assert elapsed < RUN_BUDGET_S * 3, f"the run part took {elapsed:.0f} s (budget {RUN_BUDGET_S} s)"


def promql_expressions() -> list[tuple[str, int, str]]:
    found = []
    for runbook in RUNBOOKS:
        for lang, start, lines in fenced_blocks(runbook.read_text()):
            if lang == "promql":
                found += [(runbook.name, start + i, ln.strip()) for i, ln in enumerate(lines)
                          if ln.strip() and not ln.strip().startswith("#")]
    return found


def test_promql_blocks_parse(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    expressions = promql_expressions()
    assert len(expressions) >= 10
    rules = {"groups": [{"name": "runbooks", "rules": [
        {"record": f"runbook:expr_{i}", "expr": expr} for i, (_, _, expr) in enumerate(expressions)]}]}
    path = tmp_path / "runbook-rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    where = "\n".join(f"runbook:expr_{i} = {name}:{line}" for i, (name, line, _) in enumerate(expressions))
    assert done.returncode == 0, done.stdout + done.stderr + "\n" + where


def test_promql_names_metrics_that_exist():
    known = "\n".join((REPO_ROOT / s).read_text() for s in METRIC_SOURCES)
    known += "\n".join(r.record for r in rule_set().recording)
    unknown = []
    for runbook in RUNBOOKS:
        text = runbook.read_text()
        names = [m for lang, _, lines in fenced_blocks(text) if lang == "promql" for m in METRIC.findall(
            "\n".join(lines))]
        names += [m for span in re.findall(r"`([^`]+)`", prose(text)) for m in METRIC.findall(span)]
        unknown += [f"{runbook.name}: {n}" for n in names if METRIC_SUFFIX.sub("", n) not in known]
    assert unknown == []


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=ids(RUNBOOKS))
def test_yaml_blocks_validate_against_their_schema(runbook, tmp_path):
    """A YAML block that starts with `# inventory.yaml` or `# agents/multiplexer.yaml` is loaded by
    that file's own loader; in the runbooks written with this test every YAML block names one."""
    checked = 0
    for lang, start, lines in fenced_blocks(runbook.read_text()):
        if lang != "yaml":
            continue
        header = lines[0].strip().removeprefix("#").strip() if lines else ""
        if header not in YAML_SCHEMAS:
            assert runbook.name not in WRITTEN_WITH, f"{runbook.name}:{start}: a YAML block names no schema"
            continue
        path = tmp_path / f"{runbook.stem}-{start}.yaml"
        path.write_text("\n".join(lines) + "\n")
        YAML_SCHEMAS[header](path)
        checked += 1
    if runbook.name == "dgx-spark.md":
        assert checked >= 3


def test_dashboards_and_panels_named_in_bold_exist():
    """A bold span that is not a label (ending in `.` or followed by `:`) is a dashboard or panel title."""
    dashboards = [definitions.OVERVIEW, definitions.AGENTS, definitions.ENGINE, definitions.HARDWARE]
    titles = {d.title for d in dashboards} | {p.title for d in dashboards for r in d.rows for p in r.panels}
    named, unknown = 0, []
    for runbook in RUNBOOKS:
        if runbook.name not in WRITTEN_WITH:
            continue
        for span, colon in BOLD.findall(prose(runbook.read_text())):
            span = " ".join(span.split())
            if colon or span.endswith((".", ":")):
                continue
            named += 1
            if span not in titles:
                unknown.append(f"{runbook.name}: **{span}**")
    assert unknown == []
    assert named >= 15


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=ids(RUNBOOKS))
def test_links_and_anchors_resolve(runbook):
    broken = []
    text = prose(runbook.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (runbook.parent / file).resolve() if file else runbook
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert broken == []


def test_the_index_lists_every_runbook():
    index = RUNBOOKS_DIR / "README.md"
    linked = {t.partition("#")[0] for t in LINK.findall(index.read_text())}
    assert {p.name for p in RUNBOOKS if p != index} <= linked


def test_every_alert_in_the_rules_has_its_runbook_section():
    """The troubleshooting runbook links alerts by anchor; those anchors are the rule file's."""
    alert_anchors = anchors((RUNBOOKS_DIR / "alerts.md").read_text())
    assert {a.anchor for a in rule_set().alerts} <= alert_anchors


def test_the_plots_named_are_the_plots_bench_all_writes():
    written = set(PLOTS_WRITTEN.findall((REPO_ROOT / "bench" / "runner.py").read_text()))
    named = set(re.findall(r"`(\w+)\.png`", (RUNBOOKS_DIR / "performance.md").read_text()))
    assert written and named == written


PLANTED = """# Planted

```bash
nvidia-smi -L                                   # line 4: a host program, block not marked
```

```bash
# on the DGX
nvidia-smii -L                                  # line 9: a typo is no host program
sudo nvidia-smi --query-gpu=name --format=csv   # line 10: fine, sudo's command checked
vllm serve /model --tensor-parallel-size 2 --bogus   # line 11: a flag vLLM's docs do not give
ray start --address=10.0.0.1:6379 --num-gpus=1  # line 12: fine
invoke model.plan NAME --nope                   # line 13: invoke is still checked
```

```bash
cat monitoring/prometheus/nope.yml              # line 17: a repository path that does not exist
invoke bench.compare bench/baselines/HOST/BEFORE.json bench/baselines/HOST/AFTER.json   # line 18: placeholders
```
"""


def test_planted_host_blocks_and_paths_are_reported(checker, tmp_path):
    path = tmp_path / "planted.md"
    path.write_text(PLANTED)
    found = [(p.line, p.message) for p in check_markdown(path, checker)]
    expected = [(4, "nvidia-smi: command not found"), (9, "nvidia-smii: command not found"),
                (11, "vllm serve: flag --bogus"), (13, "invoke: No idea what '--nope' is!"),
                (17, "no such path in the repository: monitoring/prometheus/nope.yml")]
    assert len(found) == len(expected), found
    for (line, message), (want_line, want) in zip(found, expected, strict=True):
        assert line == want_line and message.startswith(want), (line, message)
    assert "start its block with `# on WHERE`" in found[0][1]


def test_only_commands_that_can_run_here_are_run(checker, tmp_path):
    runner = CommandRunner(checker, tmp_path)
    markdown = ("```bash\ninvoke --help bench.predict\ninvoke bench.predict --profile dgx-spark\n"
                "invoke model.serve smollm2-135m\ninvoke model.plan NAME\n"
                "promtool check rules monitoring/prometheus/rules.yml\ncurl -s http://127.0.0.1:8090/health\n```\n"
                "```bash\n# on the DGX\ninvoke model.list\n```\n")
    runnable = [str(c) for c in extract_commands(markdown) if runner.runnable(c)]
    assert runnable == ["invoke --help bench.predict", "invoke bench.predict --profile dgx-spark",
                        "promtool check rules monitoring/prometheus/rules.yml"]


def test_a_run_sends_written_files_to_scratch_and_reports_the_exit_code(checker, tmp_path):
    runner = CommandRunner(checker, tmp_path)
    [predict, bad] = extract_commands("```bash\ninvoke bench.predict --profile dgx-spark --agents 4\n"
                                      "invoke bench.predict --profile no-such-profile\n```\n")
    result = runner.run(predict)
    assert result.ok, result.output
    assert result.argv[-2:] == ("--output-dir", str(tmp_path))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".png"]
    failed = runner.run(bad)
    assert failed.code == 1 and "no-such-profile" in failed.output
