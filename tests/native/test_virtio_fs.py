"""virtio-fs under the native core, driven by the `fs` probe guest (Linux cannot boot under
this machine's emulated KVM, so the probe speaks FUSE over the virtqueues the way Linux's
virtio_fs driver does). Checks the guest's report and the host side: files, counters,
confinement (`..` and symlinks leaving the share), read-only enforcement, and that guest root
gets no host privilege out of the share (no set-user-ID/set-group-ID files, no device nodes)."""

from __future__ import annotations

import os
import stat

import pytest

PROBE_TIMEOUT_S = 60
HELLO_TEXT = "hello from the host side\n"
OUT_TEXT = "written by the fs probe\n"
SETUID_TEXT = b"#!/bin/sh\necho host program\n"


def _share(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text(HELLO_TEXT)
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    os.symlink(str(secret), share / "escape_abs")
    os.symlink("../secret", share / "escape_rel")
    os.symlink("hello.txt", share / "inside_link")
    setuid_host = share / "setuid_host"
    setuid_host.write_bytes(SETUID_TEXT)
    os.chmod(setuid_host, 0o4755)
    return share, secret


def _run(native, share, read_only):
    vm, out = native.run_probe("fs", timeout=PROBE_TIMEOUT_S, cmdline=f"ro={int(read_only)}",
                               mounts=[(share, "hostshare", read_only)])
    return vm, out.decode(errors="replace")


def _assert_ok(vm, out):
    assert "PROBE fs OK" in out, out
    info = vm.exit_info()
    assert info["state"] == "stopped" and info["reason"] == "guest_reset", info
    dev = vm.device("virtio-fs0")
    assert dev["virtio_device_id"] == 26 and not dev["broken"], dev
    return dev["counters"]


def _assert_escapes_refused(out):
    for name in ("..", "../secret", "escape_abs", "escape_rel"):
        line = next(l for l in out.splitlines() if l.startswith(f"escape lookup {name} -> "))
        assert line.endswith(("-18", "-40")), line  # EXDEV or ELOOP


def test_fs_read_create_write_and_confinement(native, tmp_path):
    share, secret = _share(tmp_path)
    vm, out = _run(native, share, read_only=False)
    try:
        counters = _assert_ok(vm, out)
        assert "tag hostshare request queues 1" in out
        assert f"read hello.txt {len(HELLO_TEXT)} bytes, content ok" in out
        assert "inside symlink resolves to hello.txt" in out
        assert "unknown opcode -> -38" in out and "garbage header -> -22" in out
        _assert_escapes_refused(out)
        # host side: the guest's file landed in the share, nothing else moved
        assert (share / "out.txt").read_text() == OUT_TEXT
        assert secret.read_text() == "host secret\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "share"]
        assert counters["bytes_read"] == len(HELLO_TEXT)
        assert counters["bytes_written"] == len(OUT_TEXT)
        assert counters["escape_refusals"] == 4
        assert counters["unsupported_opcodes"] == 3  # MKNOD, SETATTR, the unknown one
        assert counters["malformed_requests"] >= 2  # request before INIT + garbage header
        assert counters["read_only_refusals"] == 0
        assert counters["ops"] >= 20 and counters["errors"] >= 8
    finally:
        vm.close()


def test_fs_create_strips_setid_bits_and_refuses_device_nodes(native, tmp_path):
    """Guest root sends CREATE with modes 04755/02755/06777, CREATE of char/block devices,
    MKNOD, and write-opens of a set-user-ID file the host keeps in the share."""
    share, _ = _share(tmp_path)
    umask = os.umask(0o022)   # the host process's umask applies to what the core creates
    os.umask(umask)
    vm, out = _run(native, share, read_only=False)
    try:
        counters = _assert_ok(vm, out)
        for name, asked in (("suid.bin", "04755"), ("sgid.bin", "02755"), ("both.bin", "06777")):
            assert f"create {name} mode {asked} -> 0" in out
            mode = os.stat(share / name).st_mode   # host side
            assert stat.S_ISREG(mode), (name, oct(mode))
            assert not mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(mode))
            assert stat.S_IMODE(mode) == int(asked, 8) & 0o777 & ~umask
        assert "create chardev -> -1" in out and "create blockdev -> -1" in out
        assert "mknod -> -38" in out and "setattr -> -38" in out
        for name in ("chardev", "blockdev", "mknod_dev"):
            assert not os.path.lexists(share / name)
        assert not any(stat.S_ISCHR(m) or stat.S_ISBLK(m)
                       for m in (os.lstat(p).st_mode for p in share.iterdir()))
        for what in ("open-for-write", "open-truncate", "create-truncate"):
            assert f"{what} setuid_host -> -1" in out
        assert "open-read setuid_host -> 0" in out
        assert (share / "setuid_host").read_bytes() == SETUID_TEXT
        assert stat.S_IMODE(os.stat(share / "setuid_host").st_mode) == 0o4755
        assert counters["privilege_refusals"] == 5
    finally:
        vm.close()


def test_fs_read_only_refuses_writes_host_side(native, tmp_path):
    share, _ = _share(tmp_path)
    before = sorted(os.listdir(share))
    vm, out = _run(native, share, read_only=True)
    try:
        counters = _assert_ok(vm, out)
        assert "write read-only -> -30" in out
        assert "open-for-write read-only -> -30" in out
        assert "create out.txt -> -30" in out
        assert sorted(os.listdir(share)) == before
        assert (share / "hello.txt").read_text() == HELLO_TEXT
        assert counters["read_only_refusals"] == 3
        assert counters["bytes_written"] == 0 and counters["bytes_read"] == len(HELLO_TEXT)
        _assert_escapes_refused(out)
    finally:
        vm.close()


def test_fs_config_errors_are_named(native, tmp_path):
    with pytest.raises(native.NativeCoreError, match="cannot open directory"):
        native.NativeVm(native.probe_path("fs"), mounts=[(tmp_path / "missing", "t", False)])
    with pytest.raises(native.NativeCoreError, match="tag must be"):
        native.NativeVm(native.probe_path("fs"), mounts=[(tmp_path, "x" * 37, False)])


def test_engine_mount_status_reads_fs_counters(native, tmp_path):
    """NativeInstance.mount_status() over a probe VM with a mount (bypassing __init__, whose
    refusal of mounts is still pinned by test_engine.py)."""
    from supermachine_jupyter.config import MountSpec, VmConfig
    from supermachine_jupyter.devices.mounts import MountStatus
    share, _ = _share(tmp_path)
    vm, out = _run(native, share, read_only=False)
    try:
        _assert_ok(vm, out)
        inst = native.NativeInstance.__new__(native.NativeInstance)
        inst.vm = vm
        inst.spec = type("Spec", (), {"config": VmConfig(mounts=[MountSpec(str(share), "hostshare", "/mnt/h")])})()
        [status] = inst.mount_status()
        assert isinstance(status, MountStatus) and status.dax is False
        assert status.dax_note == "no DAX window in the native core"
        assert status.counters.bytes_read == len(HELLO_TEXT)
        assert status.counters.bytes_written == len(OUT_TEXT)
        assert status.counters.ops >= 20
    finally:
        vm.close()
