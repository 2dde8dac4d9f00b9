"""The native core's layering, read from its ``#include "..."`` lines (no compiler, no KVM).

Firecracker's devices never see the VM: they are handed an interrupt trigger and guest memory.
Ours the same way (``native/src/devices/device.h``): a device includes the device tree, the
leaf helpers and the ABI header, never the VM's internals, and calls nothing of ``vm.c``.

* A module is a ``.c`` file and the ``.h`` of the same name (``virtio_mmio.{c,h}``); module A
  depends on module B when a file of A includes a file of B. That graph has no cycle.
* Only ``src/calib.c`` reaches outside ``native/src`` and ``native/include``: it runs the calib
  probe's loop (``guest/probes/calib_loop.h``) on the host.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .conftest import NATIVE

SRC = NATIVE / "src"
DEVICES = SRC / "devices"
INCLUDE_LINE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
#: What a device must not include: the VM's internals.
VM_HEADERS = (SRC / "sm_internal.h", SRC / "vm.h")
#: What a device must not name: the VM struct, vm.c's functions (sm_vm_*, sm_irq_*).
VM_NAMES = re.compile(r"\bstruct\s+sm_vm\b|\bsm_vm\b|\bsm_vm_\w+\s*\(|\bsm_irq_(?:pulse|set_level)\s*\(")
#: The one core file allowed to include a guest header.
OUTSIDE_INCLUDERS = {SRC / "calib.c"}


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*") if p.suffix in (".c", ".h"))


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", text)


def _includes(path: Path) -> list[Path]:
    """Quoted includes of path, resolved against its directory (as the compiler does first)."""
    text = _strip_comments(path.read_text(encoding="utf-8"))
    return [Path(os.path.normpath(path.parent / name)) for name in INCLUDE_LINE.findall(text)]


def _module(path: Path) -> str:
    """foo.c and foo.h are one module, named by their path without the suffix."""
    return str(path.with_suffix("").relative_to(NATIVE))


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        deps = graph.setdefault(_module(path), set())
        for inc in _includes(path):
            if inc.is_relative_to(NATIVE) and _module(inc) != _module(path):
                deps.add(_module(inc))
                graph.setdefault(_module(inc), set())
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of graph as a list of nodes (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for dep in sorted(graph[node]):
            if colour[dep] == GREY:
                return stack[stack.index(dep):] + [dep]
            if colour[dep] == WHITE:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_sources_found():
    names = {p.relative_to(SRC).as_posix() for p in _sources()}
    assert {"vm.c", "sm_internal.h", "devices/virtio_mmio.c", "devices/uart8250.c"} <= names


def test_devices_do_not_include_the_vm():
    offenders = [f"{p.relative_to(NATIVE)} includes {inc.relative_to(NATIVE)}"
                 for p in _sources() if p.is_relative_to(DEVICES)
                 for inc in _includes(p) if inc in VM_HEADERS]
    assert not offenders, "devices see only device.h, memory.h and the ABI:\n" + "\n".join(offenders)


def test_devices_do_not_call_into_the_vm():
    offenders = []
    for path in _sources():
        if not path.is_relative_to(DEVICES):
            continue
        for lineno, line in enumerate(_strip_comments(path.read_text(encoding="utf-8")).splitlines(), 1):
            if VM_NAMES.search(line):
                offenders.append(f"{path.relative_to(NATIVE)}:{lineno}: {line.strip()}")
    assert not offenders, "a device names the VM or a function of vm.c:\n" + "\n".join(offenders)


def test_no_include_cycle_among_modules():
    cycle = _find_cycle(_module_graph())
    assert cycle is None, "include cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_only_calib_reaches_outside_the_core():
    inside = (SRC, NATIVE / "include")
    offenders = [f"{p.relative_to(NATIVE)} includes {inc.relative_to(NATIVE)}"
                 for p in _sources() if p not in OUTSIDE_INCLUDERS
                 for inc in _includes(p) if not any(inc.is_relative_to(d) for d in inside)]
    assert not offenders, "\n".join(offenders)
