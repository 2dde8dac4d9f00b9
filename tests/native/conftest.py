"""Fixtures for the native-core tests: a fresh build of the cffi module and the probes.

The tests run real KVM with real probe guests. If the compiled module or a probe is older than
its sources, it is rebuilt here (``python native/build_native.py``) so ``make test`` always
tests the current C code. Nothing is skipped silently: without /dev/kvm the tests fail with
the reason.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
PACKAGE = ROOT / "supermachine_jupyter"
BUILD_SCRIPT = NATIVE / "build_native.py"


def _newest_source_mtime() -> float:
    paths = [BUILD_SCRIPT]
    for pattern in ("src/**/*.[ch]", "include/*.h", "guest/probes/*",
                    "guest/agent/protocol.[ch]", "guest/agent/dispatch.[ch]"):  # the agent probe's
        paths += [Path(p) for p in glob.glob(str(NATIVE / pattern), recursive=True)]
    return max(p.stat().st_mtime for p in paths)


def _built_mtime(module: str) -> float:
    sos = glob.glob(str(PACKAGE / f"{module}.*.so"))
    probes = glob.glob(str(PACKAGE / "_probes" / "*.elf"))
    if not sos or not probes:
        return 0.0
    return min([os.stat(p).st_mtime for p in sos + probes])


def ensure_built(sanitize: bool = False) -> None:
    """(Re)build the core module (or its ASan/UBSan twin) and the probes when stale."""
    module = "_native_asan" if sanitize else "_native"
    if _built_mtime(module) >= _newest_source_mtime():
        return
    env = dict(os.environ)
    env["SUPERMACHINE_NATIVE_SANITIZE"] = "1" if sanitize else "0"
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the native core failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def native():
    """The engines.native module with a current build; fails (never skips) without KVM."""
    if os.environ.get("SUPERMACHINE_NATIVE_MODULE", "_native") == "_native":
        ensure_built()
    from supermachine_jupyter.engines import native as native_mod
    ok, why = native_mod.kvm_check()
    assert ok, f"the native core cannot use /dev/kvm here: {why}"
    return native_mod


@pytest.fixture
def short_tmp(tmp_path_factory):
    """A short directory for AF_UNIX socket paths (108-byte limit)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="smv-", dir="/tmp")
    yield Path(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def kvm_speed(native):
    """'hardware' or 'emulated', from the calib probe (guest vs host TSC cycles)."""
    result = native.calibrate()
    print(f"\nKVM speed: {result['speed']} (guest/host cycle ratio {result['ratio']:.1f})")
    return result["speed"]


def find_guest_kernel(name: str) -> Path:
    """The project's guest kernel (issue A's build) in the user cache; fails clearly if absent."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supermachine-jupyter"
    found = sorted(cache.glob(f"kernel-*/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.fail(f"guest kernel {name} not found under {cache}/kernel-*/: build the guest "
                    "assets first (`make` builds them; see supermachine_jupyter/assets.py)")
    return found[-1]
