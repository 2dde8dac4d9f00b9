"""Build the native KVM core (cffi API mode) and the freestanding probe guests.

Used two ways:

* by the package build: ``setup.py`` has ``cffi_modules=["native/build_native.py:ffibuilder"]``,
  so ``pip install .`` / ``pip install -e .`` compiles ``supermachine_jupyter._native``. Importing
  this module also builds the probe guests into ``supermachine_jupyter/_probes/*.elf``;
* by hand: ``python native/build_native.py`` builds both in place (the .so lands next to the
  package sources).

Environment:

* ``SUPERMACHINE_NATIVE_SANITIZE=1`` builds ``supermachine_jupyter._native_asan`` instead, with
  ``-fsanitize=address,undefined``; load it with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``.
* ``SUPERMACHINE_SKIP_PROBES=1`` skips the probe guests (e.g. on a non-x86-64 build host).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from cffi import FFI

NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(NATIVE_DIR)
HEADER = os.path.join(NATIVE_DIR, "include", "supermachine.h")
PROBE_DIR = os.path.join(NATIVE_DIR, "guest", "probes")
PROBE_OUT_DIR = os.path.join(ROOT_DIR, "supermachine_jupyter", "_probes")
AGENT_DIR = os.path.join(NATIVE_DIR, "guest", "agent")
#: Linked into every probe: the runtime.
PROBE_LIBRARY_SOURCES = ("probe_lib.c",)
#: Linked into the probes named: modules of the probe directory, and the real agent's
#: protocol (framing, CRC, payloads) and frame dispatch, built from the same files.
AGENT_SHARED_SOURCES = (os.path.join(AGENT_DIR, "protocol.c"), os.path.join(AGENT_DIR, "dispatch.c"))
PROBE_MODULES = {
    "legacy": ("probe_irq.c",),
    "vsock": ("probe_vsock.c", "probe_irq.c", "probe_clock.c"),
    "smp": ("probe_clock.c",),
    "calib": ("probe_clock.c",),
    "agent": ("probe_vsock.c", "probe_irq.c", "probe_clock.c", "agent_shell.c", "agent_files.c",
              *AGENT_SHARED_SOURCES),
}
#: Probes that also carry the PVH entry (pvh_entry.S: XEN_ELFNOTE_PHYS32_ENTRY note + 32-bit
#: stub), so the same ELF boots under QEMU's ``-kernel`` (benchmarks/bench_native.py), and the
#: core takes an initrd with it as with a Linux vmlinux (``agent`` boots as an ``Image``'s
#: kernel, with an initrd it ignores). The native core then enters them through its PVH path;
#: every other probe keeps the raw 64-bit ELF entry, so both of the core's entry paths stay
#: exercised by the probe tests.
PVH_PROBES = ("uart", "idle", "agent")
PROBE_PVH_ENTRY_SOURCE = "pvh_entry.S"
PROBE_CFLAGS = [
    "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-O2", "-Wall", "-Wextra",
    "-mgeneral-regs-only", "-mno-red-zone", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none", "-fno-tree-loop-distribute-patterns", "-fno-builtin", "-Wl,--build-id=none", "-Wl,-z,norelro", "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments",
]
SANITIZE = os.environ.get("SUPERMACHINE_NATIVE_SANITIZE", "") not in ("", "0")
MODULE_NAME = "supermachine_jupyter._native_asan" if SANITIZE else "supermachine_jupyter._native"
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-pthread", "-std=gnu11"]
LINK_ARGS = ["-pthread"]
if SANITIZE:
    COMPILE_ARGS = ["-O1", "-g", "-Wall", "-Wextra", "-pthread", "-std=gnu11",
                    "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=undefined"]
    LINK_ARGS = ["-pthread", "-fsanitize=address,undefined"]


def read_cdef(path: str = HEADER) -> str:
    """The header minus every line that starts with '#': what cffi's cdef parses."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


def core_sources(relative: bool = True) -> list[str]:
    """All C sources of the core; relative to the current directory when possible (setuptools
    places object files by source path), absolute for ffibuilder.compile() (which chdirs)."""
    sources = sorted(glob.glob(os.path.join(NATIVE_DIR, "src", "**", "*.c"), recursive=True))
    if not relative:
        return sources
    cwd = os.getcwd()
    return [os.path.relpath(s, cwd) if s.startswith(cwd + os.sep) else s for s in sources]


def probe_names() -> list[str]:
    """Every C file of the probe directory that is not a library source or module."""
    modules = set(PROBE_LIBRARY_SOURCES)
    for sources in PROBE_MODULES.values():
        modules.update(sources)
    return [os.path.basename(path)[:-2]
            for path in sorted(glob.glob(os.path.join(PROBE_DIR, "*.c")))
            if os.path.basename(path) not in modules]


def build_probes(out_dir: str = PROBE_OUT_DIR, cc: str = "gcc", verbose: bool = False) -> list[str]:
    """Compile every probe guest to ``out_dir/<name>.elf``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    outputs = []
    lib = [os.path.join(PROBE_DIR, s) for s in PROBE_LIBRARY_SOURCES]
    for name in probe_names():
        out = os.path.join(out_dir, name + ".elf")
        entry = [os.path.join(PROBE_DIR, PROBE_PVH_ENTRY_SOURCE)] if name in PVH_PROBES else []
        modules = [os.path.join(PROBE_DIR, s) for s in PROBE_MODULES.get(name, ())]
        cmd = [cc, *PROBE_CFLAGS, "-I", PROBE_DIR, "-I", AGENT_DIR,
               "-T", os.path.join(PROBE_DIR, "probe.ld"),
               "-o", out, os.path.join(PROBE_DIR, name + ".c"), *lib, *modules, *entry]
        if verbose:
            print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        outputs.append(out)
    return outputs


def make_ffibuilder(relative_sources: bool = True) -> FFI:
    builder = FFI()
    builder.cdef(read_cdef())
    builder.set_source(
        MODULE_NAME,
        '#include "supermachine.h"',
        sources=core_sources(relative_sources),
        include_dirs=[os.path.join(NATIVE_DIR, "include")],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )
    return builder


ffibuilder = make_ffibuilder()

if os.environ.get("SUPERMACHINE_SKIP_PROBES", "") in ("", "0") and __name__ != "__main__":
    # Package build: cffi imports this module from setup(); build the probes alongside.
    build_probes()


if __name__ == "__main__":
    verbose = "-v" in sys.argv
    tmpdir = os.path.join(tempfile.gettempdir(), "supermachine-native-build" + ("-asan" if SANITIZE else ""))
    so = make_ffibuilder(relative_sources=False).compile(tmpdir=tmpdir, verbose=verbose)
    target_dir = os.path.join(ROOT_DIR, "supermachine_jupyter")
    dest = os.path.join(target_dir, os.path.basename(so))
    os.replace(so, dest)
    print(dest)
    if os.environ.get("SUPERMACHINE_SKIP_PROBES", "") in ("", "0"):
        for p in build_probes(verbose=verbose):
            print(p)
