"""Native-core behaviours with Linux that issue H lists as failing today.

Marked ``nested_kvm_todo``: out of the default run (each says so when skipped); run them with
``SUPERMACHINE_NESTED_TODO=1 .venv/bin/python -m pytest tests/nested -v`` (or
``-m nested_kvm_todo``). Each one should pass once issue H item 2 is done; then move it into
``test_native_linux.py`` (marker ``nested_kvm``).
"""

from __future__ import annotations

import os
import time

import pytest

from supermachine_jupyter import VmConfig

pytestmark = pytest.mark.nested_kvm_todo

NATIVE = VmConfig(engine="native")


# -- (2) vCPUs ---------------------------------------------------------------------------

@pytest.mark.parametrize("vcpus", [2])     # L1 has 2 CPUs; VmConfig caps vcpus at the host's
def test_guest_sees_its_vcpus(image, vcpus):
    with image.start(NATIVE.with_vcpus(vcpus), name=f"nested-cpus{vcpus}") as vm:
        assert vm.vcpus == vcpus
        assert vm.run("nproc").stdout == f"{vcpus}\n", vm.console_output()[-2000:]


# -- (3) virtio-fs beyond read / create / append -------------------------------------------

@pytest.fixture(scope="module")
def fs_vm(image, tmp_path_factory):
    host = tmp_path_factory.mktemp("fs") / "share"
    host.mkdir()
    (host / "file.txt").write_text("original content\n")
    (host / "rmme").write_text("x\n")
    (host / "dir-to-remove").mkdir()
    os.symlink("file.txt", host / "link-inside")
    os.symlink("/etc/hostname", host / "link-outside")
    with image.start(NATIVE.with_virtiofs(str(host), "share", "/mnt/s"), name="nested-fs") as vm:
        yield vm, host


@pytest.mark.parametrize("command, check", [
    ("echo new > /mnt/s/file.txt", lambda h: (h / "file.txt").read_text() == "new\n"),
    ("truncate -s 3 /mnt/s/file.txt", lambda h: (h / "file.txt").stat().st_size == 3),
    ("touch -d '2001-01-01 00:00' /mnt/s/file.txt",
     lambda h: time.gmtime((h / "file.txt").stat().st_mtime).tm_year == 2001),
    ("chmod 600 /mnt/s/file.txt", lambda h: (h / "file.txt").stat().st_mode & 0o777 == 0o600),
    ("mkdir /mnt/s/newdir", lambda h: (h / "newdir").is_dir()),
    ("rm /mnt/s/rmme", lambda h: not (h / "rmme").exists()),
    ("rmdir /mnt/s/dir-to-remove", lambda h: not (h / "dir-to-remove").exists()),
    ("echo m > /mnt/s/a && mv /mnt/s/a /mnt/s/b", lambda h: (h / "b").read_text() == "m\n"),
    ("ln -s file.txt /mnt/s/sym", lambda h: os.readlink(h / "sym") == "file.txt"),
    ("echo l > /mnt/s/orig && ln /mnt/s/orig /mnt/s/hard",
     lambda h: (h / "hard").stat().st_ino == (h / "orig").stat().st_ino),
    ("df /mnt/s", None),
], ids=["overwrite", "truncate", "utimes", "chmod", "mkdir", "rm", "rmdir", "mv", "symlink",
        "link", "statfs"])
def test_virtio_fs_operations(fs_vm, command, check):
    vm, host = fs_vm
    result = vm.run(command)
    assert result.ok, result
    if check is not None:
        assert check(host), f"{command!r} ran but the host folder shows otherwise"


def test_virtio_fs_symlinks_are_links_and_outside_targets_do_not_break_ls(fs_vm):
    vm, _ = fs_vm
    assert vm.run("readlink /mnt/s/link-inside").stdout == "file.txt\n"
    assert vm.run("test -L /mnt/s/link-inside").ok
    listing = vm.run("ls -la /mnt/s")
    assert listing.ok, listing


# -- (8) calibration -----------------------------------------------------------------------

def test_calibration_gives_the_same_verdict_every_run(l1_kvm):
    from supermachine_jupyter.engines.accel import kvm_status
    verdicts = [kvm_status(refresh=True) for _ in range(5)]
    print("\n".join(v.summary() for v in verdicts))
    assert {v.speed for v in verdicts} == {"hardware"}, [v.summary() for v in verdicts]
