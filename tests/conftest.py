"""Shared fixtures: the default guest image and booted QEMU VMs.

``start_vm()`` boots a VM that lives until the end of the session (or until the test stops
it); ``shared_vm`` is one VM for the whole session, for tests that leave no trace in it.
"""

from __future__ import annotations

import shutil
import signal

import pytest


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored
    # (and so would every process it starts): the interrupt tests need it delivered, as in a
    # Jupyter kernel.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


def _oci_registry(tmp_path_factory, name: str, **auth):
    from .oci_registry import Registry, missing_tools
    missing = missing_tools()
    if missing:
        pytest.skip(f"the OCI tests need {', '.join(missing)} (make system-deps installs them)")
    registry = Registry(tmp_path_factory.mktemp(name), **auth).start().with_test_images()
    return registry


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """Debian's docker-registry on 127.0.0.1 (plain HTTP) serving the test images of
    tests/oci_registry.py: ``.ref("busybox" | "multi" | "arm64only" | "python")`` builds and
    pushes one on first use and returns its reference; ``.requests()`` is the access log."""
    registry = _oci_registry(tmp_path_factory, "oci-registry")
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def oci_auth_registry(tmp_path_factory):
    """Like ``oci_registry``, with htpasswd basic auth (``.user`` / ``.password``;
    ``.write_authfile(path)`` writes an auth.json)."""
    registry = _oci_registry(tmp_path_factory, "oci-auth-registry", user="tester",
                             password="s3cret-pw")
    yield registry
    registry.stop()
