"""The package's shape (docs/architecture.md): imports run downhill only, no import cycles, no
oversized modules without a reason.

The imports are read from the source with :mod:`ast` (module-level and function-level ``import``
statements alike, so a lazy import cannot hide an uphill dependency); nothing is imported.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = "xmipp_accel"
ROOT = Path(__file__).resolve().parents[1]

# Layers, lowest first; a module may import its own layer or lower ones.
LAYERS: List[Tuple[str, ...]] = [
    ("backend", "errors", "constants", "threads", "bibtex", "__init__"),
    ("em", "io"),
    ("gpu",),
    ("jobs",),
    ("cli", "plots"),
    ("protocols", "wizards"),
    ("viewers", "workflows"),
    ("__main__",),   # the composition root: the console script, above everything
]
LAYER_OF: Dict[str, int] = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    """Dotted name → file of every module of the package except the tests."""
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))
            if "tests" not in p.relative_to(ROOT).parts}


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Iterator[Tuple[str, int]]:
    """(imported package module, line) for every import of ``module`` that names the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module or "") if node.level else (node.module or "")
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:   # ``from pkg import submodule`` names a module
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYER_OF:
        raise AssertionError(f"{module}: its top-level name {top!r} has no layer in docs/architecture.md "
                             "(add it to LAYERS there and here)")
    return LAYER_OF[top]


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    known = set(modules)
    return {m: {t for t, _ in imports_of(m, p, known) if t != m} for m, p in modules.items()}


def test_imports_run_downhill_only():
    modules = package_modules()
    known = set(modules)
    uphill = [f"{m}:{line} imports {target} (layer {layer(m)} → {layer(target)})"
              for m, p in modules.items() for target, line in imports_of(m, p, known)
              if layer(target) > layer(m)]
    assert not uphill, "imports that run uphill:\n" + "\n".join(uphill)


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    # A package's __init__ re-exporting its submodules is not a cycle of ideas: drop edges from a
    # package to its own submodules (importing ``pkg.sub`` always runs ``pkg/__init__`` first).
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    cycles = strongly_connected(_without_package_inits(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_the_checks_catch_an_uphill_import_and_a_cycle():
    assert layer(f"{PACKAGE}.gpu.x") > layer(f"{PACKAGE}.io.y")
    assert layer(f"{PACKAGE}.viewers.v") > layer(f"{PACKAGE}.protocols.p")
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


REASON = re.compile(r"\b(longer than|over) \d+ lines\b|\bone idea\b", re.IGNORECASE)


def test_modules_are_small_or_say_why():
    long = []
    for p in package_modules().values():
        n = len(p.read_text().splitlines())
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(p.read_text())) or ""
            if not REASON.search(doc):
                long.append(f"{p.relative_to(ROOT.parent)}: {n} lines and no reason in its docstring "
                            f"(say why it is longer than {MAX_LINES} lines, or split it)")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_documented_layers_are_the_tested_ones(doc):
    text = (ROOT.parent / doc).read_text()
    for names in LAYERS:
        for name in names:
            if name != "__init__":
                assert f"`{name}`" in text, f"{doc} does not name the layer member `{name}`"
