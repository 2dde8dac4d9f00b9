"""The hardware branches of the host's native-core tests, run where KVM runs Linux.

``tests/native/`` runs on every host; where its KVM is emulated (this workplace) the Linux
tests there check that early boot fails clearly, and their ``kvm_speed == "hardware"`` branch
never runs. Here, inside L1, those same test functions run with ``kvm_speed="hardware"`` and
must reach the real outcome: the kernel runs its init (PVH vmlinux, bzImage), the engine's
agent answers over the vsock mux.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.native import test_engine, test_linux_early_boot

pytestmark = pytest.mark.nested_kvm


@pytest.fixture
def native(l1_kvm):
    from supermachine_jupyter.engines import native as module
    ok, why = module.kvm_check()
    assert ok, f"the native core cannot use L1's /dev/kvm: {why}"
    return module


@pytest.fixture
def short_tmp():
    """A short directory for AF_UNIX socket paths (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="smv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_pvh_vmlinux_runs_its_init(native, capsys):
    test_linux_early_boot.test_pvh_vmlinux_early_boot(native, "hardware")
    assert "kernel boots to its init" in capsys.readouterr().out


def test_bzimage_decompresses_and_boots(native, capsys):
    test_linux_early_boot.test_bzimage_boot_protocol_entry(native, "hardware")
    assert "bzImage decompresses" in capsys.readouterr().out


def test_native_engine_reaches_the_agent(native, short_tmp, capsys):
    test_engine.test_native_engine_surfaces_early_boot_failure(native, "hardware", short_tmp)
    assert "the agent answered over the vsock mux" in capsys.readouterr().out
