"""The package's shape: one-way imports, the README's Python example, the command line."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rmod_distill"
# Entry points: the stages, and what reaches them by name (the command line, the recipe reference).
STAGE_MODULES = {f"rmod_distill.{name}" for name in ("generate", "distill", "eval", "values", "download", "iterate",
                                                   "compare", "init", "cli", "recipe_docs")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """stage, engine or basic (every other module of the package)."""
    if module in STAGE_MODULES:
        return "stage"
    if module == "rmod_distill.engine" or module.startswith("rmod_distill.engine."):
        return "engine"
    return "basic"


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that ``path`` imports anywhere (functions included), with a line number each.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int):
        if target in modules and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}", node.lineno)
                else:
                    add(source, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = all_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def test_graph_sees_the_package():
    """Guards the checks below against passing vacuously on an empty or misread graph."""
    graph = import_graph()
    assert {"rmod_distill.generate", "rmod_distill.engine.decoding", "rmod_distill.weights"} <= graph.keys()
    assert "rmod_distill.engine.selection" in graph["rmod_distill.engine.decoding"]
    # An import inside a function body is seen too.
    assert "rmod_distill.policy" in graph["rmod_distill.engine.decoding"]


def layering_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    allowed = {"stage": {"engine", "basic"}, "engine": {"engine", "basic"}, "basic": {"basic"}}
    bad = []
    for src, targets in sorted(graph.items()):
        for dst, line in sorted(targets.items()):
            if layer(dst) not in allowed[layer(src)] or (layer(src) == layer(dst) == "stage"):
                bad.append(f"{src} ({layer(src)}) imports {dst} ({layer(dst)}) at line {line}")
    return bad


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_flow_one_way():
    """stages -> engine -> basics; no stage imports another (cli reaches stages by name only)."""
    bad = layering_violations(import_graph())
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checks_catch_bad_edges():
    """The checks fail on a graph with a basic importing the engine, a stage importing a stage, a cycle."""
    graph = {
        "rmod_distill.weights": {"rmod_distill.engine.selection": 1},
        "rmod_distill.engine.selection": {"rmod_distill.weights": 2},
        "rmod_distill.eval": {"rmod_distill.generate": 3},
        "rmod_distill.generate": {},
    }
    bad = layering_violations(graph)
    assert any(b.startswith("rmod_distill.weights (basic) imports rmod_distill.engine.selection") for b in bad)
    assert any(b.startswith("rmod_distill.eval (stage) imports rmod_distill.generate") for b in bad)
    assert find_cycle(graph) == ["rmod_distill.engine.selection", "rmod_distill.weights",
                                 "rmod_distill.engine.selection"]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Quick look in Python\s*\n+```python\n(.*?)^```", text, re.M | re.S)
    assert match, "README.md: no ```python block right after '## Quick look in Python'"
    return match.group(1)


@pytest.mark.slow
def test_readme_quick_look_runs():
    """The README's Python example runs as written (it loads the real embedded policy and scorers)."""
    code = readme_python_block()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The block ends with a comment showing what it prints: the names exactly, the rewards closely.
    shown = re.search(r"^# (\[.*?\]) \[\[(.*?)\]\]", code, re.M)
    assert shown, "the README block no longer shows its output in a comment"
    printed = proc.stdout.strip().splitlines()[-1]
    assert printed.startswith(shown.group(1)), printed
    numbers = re.compile(r"-?\d+\.?\d*(?:e[-+]?\d+)?")
    got = [float(x) for x in numbers.findall(printed[len(shown.group(1)):])]
    assert got == pytest.approx([float(x) for x in numbers.findall(shown.group(2))], abs=0.02), printed


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rmod_distill.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# The typed recipe of each stage; download, compare and init take arguments instead of a recipe.
STAGE_CONFIGS = {"generate": "GenerateConfig", "distill": "DistillConfig", "eval": "EvalConfig",
                 "values": "ValuesConfig", "iterate": "IterateConfig"}
ARGUMENT_KEYS = {"download": ["source", "--to"], "compare": ["base", "--out"], "init": ["name", "--policy"]}


def recipe_keys(cls, prefix: str = "") -> list[str]:
    """Every key of a recipe dataclass as ``--a.b``, nested dataclasses flattened."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints.get(f.name)):
            keys += recipe_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"--{prefix}{f.name}")
    return keys


def test_every_stage_is_covered():
    from rmod_distill.cli import STAGES

    assert set(STAGES) == set(STAGE_CONFIGS) | set(ARGUMENT_KEYS)


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS) + sorted(ARGUMENT_KEYS))
def test_stage_help_lists_keys(stage):
    from rmod_distill.cli import STAGES

    if stage in ARGUMENT_KEYS:
        expected = ARGUMENT_KEYS[stage]
    else:
        module = importlib.import_module(STAGES[stage][0])
        expected = recipe_keys(getattr(module, STAGE_CONFIGS[stage]))
    assert len(expected) >= 2
    proc = cli(stage, "--help")
    assert proc.returncode == 0, proc.stderr[-4000:]
    listed = set(re.findall(r"^\s+(--[\w.]+)\s", proc.stdout, re.M)) | set(proc.stdout.split())
    missing = [k for k in expected if k not in listed]
    assert not missing, f"rmod-distill {stage} --help does not list {missing}:\n{proc.stdout[-2000:]}"


def test_no_arguments_prints_usage_and_exits_2():
    proc = cli()
    assert proc.returncode == 2
    assert "usage: rmod-distill <stage>" in proc.stdout + proc.stderr
    from rmod_distill.cli import STAGES

    for stage in STAGES:
        assert stage in proc.stdout + proc.stderr
