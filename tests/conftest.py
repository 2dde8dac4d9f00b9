"""Shared fixtures: the default guest image and booted QEMU VMs.

``start_vm()`` boots a VM that lives until the end of the session (or until the test stops
it); ``shared_vm`` is one VM for the whole session, for tests that leave no trace in it.
"""

from __future__ import annotations

import shutil

import pytest


def _need_qemu() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")


@pytest.fixture(scope="session")
def guest_image():
    """The default guest image (built into the user cache on first use)."""
    _need_qemu()
    from supermachine_jupyter.image import Image
    return Image.default()


@pytest.fixture(scope="session")
def start_vm(guest_image):
    """Factory: ``start_vm(**VmConfig fields)`` boots a QEMU VM; all are stopped at the end."""
    from supermachine_jupyter.config import VmConfig
    vms = []

    def start(**config):
        config.setdefault("engine", "qemu")
        vm = guest_image.start(VmConfig(**config))
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.stop(timeout=5)


@pytest.fixture(scope="session")
def shared_vm(start_vm):
    """One running VM shared by the whole session: do not leave state behind in it."""
    return start_vm()
