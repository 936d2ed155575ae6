"""The repository's own packages form layers, dgxready < model < bench < agents < monitoring < provision
(whose monitoring step installs what monitoring/ generates), with the entry point repro on top: no
module imports one of a higher layer, and no import loop joins modules. Imports under TYPE_CHECKING
and inside functions count like any other."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from dgxready.settings import REPO_ROOT

LAYERS = ("dgxready", "model", "bench", "agents", "provision", "repro", "monitoring")
RANK = {"dgxready": 0, "model": 1, "bench": 2, "agents": 3, "monitoring": 4, "provision": 5, "repro": 5}
# backup stands on agents (its drill runs a multiplexer) and under provision (whose backup step sets it up).
LAYERS += ("backup",)
RANK["backup"] = RANK["agents"] + 0.5


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.imported}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_modules() -> dict[str, Path]:
    return {module_name(p): p for package in LAYERS for p in sorted((REPO_ROOT / package).rglob("*.py"))}


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def targets(node: ast.AST, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    source = absolute(node, importer, is_package)
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        for target in targets(node, module, path.name == "__init__.py", modules):
            if target in modules and target != module:
                found.append(Import(module, target, f"{path.relative_to(REPO_ROOT)}:{node.lineno}"))
    return list(dict.fromkeys(found))


def import_graph() -> list[Import]:
    modules = repo_modules()
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def rank(module: str) -> int:
    return RANK[module.split(".")[0]]


def upward_imports(graph: list[Import]) -> list[Import]:
    return [imp for imp in graph if rank(imp.imported) > rank(imp.importer)]


def import_loops(graph: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        edges.setdefault(imp.importer, set()).add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return loops


def describe_loop(loop: list[str], graph: list[Import]) -> str:
    inside = [str(imp) for imp in graph if imp.importer in loop and imp.imported in loop]
    return "loop between " + ", ".join(loop) + ":\n    " + "\n    ".join(inside)


def test_no_package_imports_one_that_stands_above_it():
    violations = upward_imports(import_graph())
    assert not violations, "imports of a higher layer:\n" + "\n".join(map(str, violations))


def test_no_import_loop_joins_the_repositorys_modules():
    graph = import_graph()
    loops = import_loops(graph)
    assert not loops, "\n".join(describe_loop(loop, graph) for loop in loops)


def test_the_checker_sees_a_loop_through_a_type_checking_import_and_an_upward_import():
    graph = [Import("agents.proxy", "agents.server", "agents/proxy.py:22"),
             Import("agents.server", "agents.proxy", "agents/server.py:24"),
             Import("bench.workloads", "agents.roles", "bench/workloads.py:10")]
    assert import_loops(graph) == [["agents.proxy", "agents.server"]]
    assert upward_imports(graph) == [graph[2]]
