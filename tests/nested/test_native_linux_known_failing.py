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

from supermachine_jupyter import Image, VmConfig

pytestmark = pytest.mark.nested_kvm_todo

NATIVE = VmConfig(engine="native")


# -- (1) snapshot / restore of a Linux guest -----------------------------------------------

@pytest.fixture(scope="module")
def snapshot_of_linux(image, tmp_path_factory):
    """A snapshot of a booted native VM whose guest wrote a file in RAM (/root)."""
    path = tmp_path_factory.mktemp("snaps") / "linux"
    with image.start(NATIVE.with_memory_mib(256), name="nested-snap-src") as vm:
        assert vm.run("echo before-snapshot > /root/mark").ok
        vm.snapshot(path)
    return path


def test_restored_linux_guest_answers_and_memory_continues(snapshot_of_linux):
    with Image.from_snapshot(snapshot_of_linux).start(NATIVE, name="nested-restored") as vm:
        assert vm.run("cat /root/mark").stdout == "before-snapshot\n"
        assert vm.run("uname -s").stdout == "Linux\n"


def test_two_restores_are_independent_and_a_restore_can_be_snapshotted(snapshot_of_linux,
                                                                        tmp_path):
    image = Image.from_snapshot(snapshot_of_linux)
    with image.start(NATIVE, name="nested-r1") as a, image.start(NATIVE, name="nested-r2") as b:
        assert a.run("echo a > /root/who").ok and b.run("echo b > /root/who").ok
        assert (a.run("cat /root/who").stdout, b.run("cat /root/who").stdout) == ("a\n", "b\n")
        a.snapshot(tmp_path / "of-restore")
    with Image.from_snapshot(tmp_path / "of-restore").start(NATIVE, name="nested-rr") as again:
        assert again.run("cat /root/who /root/mark").stdout == "a\nbefore-snapshot\n"


def test_unnamed_native_cells_use_the_prebooted_snapshot(capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from supermachine_jupyter.snapshots import cache as snapshot
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    try:
        shell.run_cell_magic("vm", "--engine native", "echo first")     # boots, makes the cache
        snapshot.wait_for_background(120)
        capsys.readouterr()
        shell.run_cell_magic("vm", "--engine native", "echo second")    # restores
        out = capsys.readouterr()
        assert "second" in out.out and "restore" in out.out, out
        assert "not used" not in out.out + out.err, out
    finally:
        shell.run_line_magic("vm", "stop --all")


# -- (2) vCPUs: snapshot / restore of an SMP guest (waits for (1)) ------------------------

def test_restored_two_vcpu_linux_guest_keeps_both_cpus(image, tmp_path):
    path = tmp_path / "smp-linux"
    with image.start(NATIVE.with_vcpus(2).with_memory_mib(256), name="nested-smp-snap") as vm:
        assert vm.run("nproc").stdout == "2\n"
        vm.snapshot(path)
    with Image.from_snapshot(path).start(NATIVE, name="nested-smp-restored") as vm:
        assert vm.vcpus == 2
        assert vm.run("nproc").stdout == "2\n"
        for cpu in (0, 1):
            ran_on = vm.run(f"busybox taskset -c {cpu} cut -d' ' -f39 /proc/self/stat")
            assert ran_on.stdout == f"{cpu}\n", ran_on


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
