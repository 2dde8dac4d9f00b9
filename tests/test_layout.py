"""The package's layering, checked from its source (no VM): issue J's rules stay true.

* No import loop among the Python modules (every import counts, also those inside functions;
  only ``if TYPE_CHECKING:`` blocks are left out, as they never run).
* Nothing outside ``engines/`` asks which engine it is: engines own their differences.
* The module paths of the previous layout that notebooks used still import (deprecated).
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "supermachine_jupyter"
ENGINE_BRANCH = re.compile(r"""\bengine(?:_name)?\s*[!=]=|[!=]=\s*["'](?:native|qemu)["']""")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            targets |= submodules or ({base} & modules.keys())
        elif isinstance(node, ast.Import):
            targets |= {a.name for a in node.names} & modules.keys()
    return targets - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            found = visit(target, path + [module])
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


def test_no_import_loop():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert sum(map(len, graph.values())) > 50, "the import graph came out (nearly) empty"
    cycle = _cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_engine_branch_outside_engines():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "engines" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ENGINE_BRANCH.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert ENGINE_BRANCH.search('if config.engine == "native":')   # the check can fail


@pytest.mark.parametrize("old, name, new", [
    ("supermachine_jupyter.snapshot", "SnapshotError", "supermachine_jupyter.errors"),
    ("supermachine_jupyter.snapshot", "SnapshotTimeoutError", "supermachine_jupyter.errors"),
    ("supermachine_jupyter.snapshot", "cache_enabled", "supermachine_jupyter.snapshots.cache"),
    ("supermachine_jupyter.accel", "kvm_status", "supermachine_jupyter.engines.accel"),
])
def test_old_module_paths_still_import(old, name, new):
    import importlib
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and f"{old}.{name} moved to" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        importlib.import_module(old).nope  # noqa: B018
