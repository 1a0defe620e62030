"""The policy layer: one interface (radixkv/core/policy.py), one registry (radixkv/eviction/policies.py),
and no import cycle among the library's modules (tests/test_architecture.py checks the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import radixkv
from radixkv.core.policy import EvictionPolicy
from radixkv.eviction.policies import DEFAULT_EVICTION, POLICIES, make_policy

CORE = Path(radixkv.__file__).parent
HOOKS = ("bind", "key", "segments", "on_attach", "on_hit", "on_evict", "on_clear", "check")


def _core_imports() -> dict[str, set[str]]:
    """Module -> core modules it imports at run time (TYPE_CHECKING blocks excluded)."""
    graph: dict[str, set[str]] = {}
    modules = [p for p in CORE.rglob("*.py") if p.stem != "__init__"]
    for path in modules:
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []  # type-only imports never run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                if node.module:
                    deps.add(node.module.split(".")[-1])
                else:
                    deps.update(a.name for a in node.names)
        graph[path.stem] = deps & {p.stem for p in modules}
    return graph


def test_no_import_cycle_among_core_modules() -> None:
    graph = _core_imports()
    assert "eviction" not in graph["reuse_odds"] and "reuse_odds" not in graph["eviction"]
    state: dict[str, int] = {}

    def visit(mod: str, trail: list[str]) -> None:
        assert state.get(mod) != 1, "import cycle: " + " -> ".join([*trail, mod])
        if state.get(mod) == 2:
            return
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*trail, mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])


def test_the_interface_module_imports_no_policy() -> None:
    assert _core_imports()["policy"] == set()


def test_every_hook_is_overridden_by_some_registered_policy() -> None:
    """A hook no policy uses is dead weight in the interface."""
    for hook in HOOKS:
        assert any(hook in vars(cls) for cls in POLICIES.values()), f"no policy overrides {hook}"
    public = {n for n, v in vars(EvictionPolicy).items() if callable(v) and not n.startswith("_")}
    assert public == set(HOOKS), f"hooks {public ^ set(HOOKS)} are not documented here"


def test_the_registry_maps_names_to_fresh_policies() -> None:
    assert DEFAULT_EVICTION in POLICIES and radixkv.POLICIES is POLICIES
    for name, cls in POLICIES.items():
        a, b = make_policy(name), make_policy(name)
        assert cls.name == name and isinstance(a, cls) and a is not b
