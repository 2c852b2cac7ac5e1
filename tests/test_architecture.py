"""The house rules of docs/architecture.md, checked on the source: no import circles (lazy
imports inside functions included), imports run one way (commands -> flows and platform ->
tasks -> libraries), few loose modules, and every Prefect entrypoint in prefect.yaml imports.

    .venv/bin/python -m pytest tests/test_architecture.py -v
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantflow"
MAX_LOOSE_MODULES = 8

# Higher layers may import lower ones and their own; never the other way round. Every
# package not named here (storage, reports, config, evaluation, quantization, serving,
# monitoring) and every loose module is a library.
LAYERS = {"cli": 3, "demo": 3, "flows": 2, "platform": 2, "tasks": 1}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the quantflow modules it imports anywhere in its body."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in files else ""

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {known(a.name) for a in node.names if a.name.startswith("quantflow")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.startswith("quantflow"):
                    # `from quantflow.storage import store` imports the module store
                    found |= {known(f"{source}.{a.name}") if f"{source}.{a.name}" in files else known(source)
                              for a in node.names}
        graph[name] = found - {name, "", "quantflow"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_no_import_circles_and_imports_run_one_way():
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    graph = import_graph()
    assert len(graph) > 100, "the graph missed quantflow's modules"
    assert "quantflow.storage.store" in graph["quantflow.storage.artifacts"], "imports were not read"
    assert circles(graph) == [], "import circles (break them; see docs/architecture.md)"
    upward = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                    if layer(t) > layer(m))
    assert upward == [], "imports against the layers (commands -> flows/platform -> tasks -> libraries)"


def test_few_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_LOOSE_MODULES, (
        f"{len(loose)} loose modules in quantflow/ ({', '.join(loose)}): put new ones in the "
        "package of their role (docs/architecture.md)")


def prefect_entrypoints() -> list[str]:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    return sorted({d["entrypoint"] for d in spec["deployments"]})


@pytest.mark.parametrize("entrypoint", prefect_entrypoints())
def test_prefect_entrypoints_import(entrypoint):
    from prefect import Flow

    path, _, attr = entrypoint.partition(":")
    assert (ROOT / path).is_file(), f"prefect.yaml names {path}, which does not exist"
    module = importlib.import_module(module_name(ROOT / path))
    assert isinstance(getattr(module, attr, None), Flow), f"{entrypoint} is not a Prefect flow"
