"""The package's architecture: layers that import one way, no import cycles, a core without transformers.

Imports are read from the source (ast), not by importing: every import at module level, in a
class body or under `if TYPE_CHECKING:` is an edge of the import graph. The library (the
`radixkv/` directory) must have no cycle, type-only ones included, and neither may the whole
with the integrations and benchmarks added. Imports inside functions (the lazy ones) are
left out of the graph but still obey the layer rules: each package's `__init__` docstring says,
after "May import:" and before "never", which other radixkv packages (in backticks) and which
third-party modules it may import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "radixkv": ROOT / "radixkv",
    "radixkv.integrations": ROOT / "integrations",
    "radixkv.benchmarks": ROOT / "benchmarks",
}
LAYERS = ("radixkv.core", "radixkv.eviction", "radixkv.tiers")
MODULE_RULES = {
    # module -> (radixkv packages it may import, third-party modules it may import)
    "radixkv.cache": ({"radixkv.core", "radixkv.eviction", "radixkv.tiers"}, {"torch"}),
    "radixkv.planner": (set(), set()),
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for prefix, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == "radixkv" and parts[:1] in (["integrations"], ["benchmarks"]):
                continue
            mods[name] = path
    return mods


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> tuple[set[str], set[str], set[str]]:
    """(imports that run on import or under TYPE_CHECKING, every import including lazy ones,
    imports that run on import)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    eager: set[str] = set()
    every: set[str] = set()
    runtime: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        out = []
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            out.append(sub if sub in MODULES else mod)
        return out

    def walk(nodes: list[ast.stmt], lazy: bool, typing_only: bool = False) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found = targets(node)
                every.update(found)
                if not lazy:
                    eager.update(found)
                    if not typing_only:
                        runtime.update(found)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(node.body, True)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.body, lazy, True)
                walk(node.orelse, lazy, typing_only)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        walk([n for n in inner if isinstance(n, ast.stmt | ast.excepthandler)], lazy, typing_only)

    walk(tree.body, False)
    return eager, every, runtime


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _rules(layer: str) -> tuple[set[str], set[str]]:
    """The radixkv packages and the third-party modules that `layer`'s docstring allows."""
    doc = " ".join((ast.get_docstring(ast.parse(MODULES[layer].read_text())) or "").split())
    assert doc and "May import:" in doc, f"{layer}/__init__.py's docstring must say what it may import"
    allowed = doc.split("May import:", 1)[1].split("never", 1)[0]
    return set(re.findall(r"`(radixkv[\w.]*)`", allowed)), set(re.findall(r"[a-z_]+", allowed))


def test_sources_are_found() -> None:
    for name in ("radixkv", "radixkv.cache", "radixkv.core.tree", "radixkv.eviction.policies", "radixkv.tiers.redis"):
        assert name in MODULES
    assert "radixkv.integrations.hf" in MODULES and "radixkv.benchmarks.harness" in MODULES


def _library(name: str) -> bool:
    return not name.startswith(("radixkv.integrations", "radixkv.benchmarks"))


def test_no_import_cycles_in_the_library_type_only_ones_included() -> None:
    edges = {name: {t for t in eager if t in MODULES and _library(t)} for name, (eager, *_) in GRAPH.items()}
    edges = {name: targets for name, targets in edges.items() if _library(name)}
    assert len(edges) > 20
    assert _find_cycle(edges) is None, " -> ".join(_find_cycle(edges) or [])


def test_no_import_cycles_with_the_integrations_and_benchmarks_type_only_ones_included() -> None:
    edges = {name: {t for t in eager if t in MODULES} for name, (eager, *_) in GRAPH.items()}
    assert _find_cycle(edges) is None, " -> ".join(_find_cycle(edges) or [])


def test_the_cycle_check_sees_type_checking_imports(tmp_path: Path) -> None:
    # A TYPE_CHECKING import back from the policy interface to the tree would be a cycle.
    edges = {name: {t for t in eager if t in MODULES} for name, (eager, *_) in GRAPH.items()}
    edges["radixkv.core.policy"] = edges["radixkv.core.policy"] | {"radixkv.core.tree"}
    assert _find_cycle(edges) is not None
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .tree import Node\n")
    eager, _, runtime = _imports("radixkv.core.probe", probe)
    assert "radixkv.core.tree" in eager and "radixkv.core.tree" not in runtime


def test_each_layer_imports_only_what_its_docstring_allows() -> None:
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for name, (_, every, _) in GRAPH.items():
        layer = _layer(name)
        if layer is not None:
            packages, words = _rules(layer)
            packages.add(layer)
        elif name in MODULE_RULES:
            packages, words = MODULE_RULES[name]
        else:
            continue
        for target in every:
            top = target.split(".")[0]
            if top == "radixkv":
                if _layer(target) not in packages and target not in packages:
                    problems.append(f"{name} imports {target}")
            elif top and top not in stdlib and top != "__future__" and top not in words:
                problems.append(f"{name} imports {target}")
    assert not problems, problems


def test_the_layer_rules_are_as_documented() -> None:
    assert _rules("radixkv.core")[0] == set()
    assert _rules("radixkv.eviction")[0] == {"radixkv.core"}
    assert _rules("radixkv.tiers")[0] == {"radixkv.core"}
    for layer in LAYERS:
        assert "transformers" not in _rules(layer)[1]


def test_policies_and_tiers_do_not_name_the_tree_node_or_the_match() -> None:
    _, every, _ = GRAPH["radixkv.core.policy"]
    assert "radixkv.core.tree" not in every
    _, every, _ = GRAPH["radixkv.tiers.tiers"]
    assert "radixkv.cache" not in every and "radixkv" not in every


def test_the_library_imports_and_works_without_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None
        import torch
        import radixkv, radixkv.core, radixkv.eviction, radixkv.tiers, radixkv.planner
        cache = radixkv.PrefixCache(radixkv.KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32),
                                    capacity_tokens=64, block_size=4)
        assert cache.match(list(range(8))).num_tokens == 0
        assert not any(m.startswith("transformers") and sys.modules[m] is not None for m in sys.modules)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
