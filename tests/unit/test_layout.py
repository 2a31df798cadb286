"""Tests for the package's shape: no import cycles, every module readable whole."""

from __future__ import annotations

import ast
from pathlib import Path

import worker

ROOT = Path(worker.__file__).parent
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    """Every module of the worker package by dotted name."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports; `from pkg import submodule` counts as the submodule."""
    edges: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            edges |= subs
            if len(subs) < len(node.names) and node.module in modules:
                edges.add(node.module)
        elif isinstance(node, ast.Import):
            edges |= {a.name for a in node.names} & modules.keys()
    return edges - {name}


def test_no_import_cycles() -> None:
    """No module of the package imports, through others, itself."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    in_cycle = []
    for start, edges in graph.items():
        seen, todo = set(), list(edges)
        while todo:
            current = todo.pop()
            if current == start:
                in_cycle.append(start)
                break
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
    assert in_cycle == []


def test_every_module_is_readable_whole() -> None:
    """No module of the package is longer than 300 lines."""
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
