"""virtio-fs under the native core, driven by the `fs` probe guest (Linux cannot boot under
this machine's emulated KVM, so the probe speaks FUSE over the virtqueues the way Linux's
virtio_fs driver does, and sends what Linux never does). Checks the guest's report and the host
side: files, counters, confinement (names with '/', '.', '..', oversized names, symlinks leaving
the share used as directories, renames towards the outside), read-only enforcement of every
modifying op, the namespace ops (mkdir, rename, symlink, link, unlink, rmdir, statfs, fsync,
fallocate, lseek), and that guest root gets no host privilege out of the share (no
set-user-ID/set-group-ID files, no device nodes, no chown). Linux's own driver runs the same ops
in the nested tier (tests/nested/test_native_linux.py)."""

from __future__ import annotations

import os
import stat

import pytest

PROBE_TIMEOUT_S = 60
HELLO_TEXT = "hello from the host side\n"
OUT_TEXT = "written by the fs probe\n"
SETUID_TEXT = b"#!/bin/sh\necho host program\n"
SPARSE_HOLE_BYTES = 1024 * 1024
MTIME_2001 = 978307200


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
    (share / "rmme").write_text("remove me\n")
    (share / "emptydir").mkdir()
    with open(share / "sparse.bin", "wb") as sparse:     # a hole, then data
        sparse.seek(SPARSE_HOLE_BYTES)
        sparse.write(b"d" * 4096)
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


def _assert_names_and_links_confined(out, secret):
    """Names Linux never sends are refused; a symlink that points outside is a symlink (its
    text handed to the guest), never followed: opening it or looking a name up through it
    fails host-side."""
    for name in ("..", ".", "../secret", "a/b", "/etc"):
        assert f"bad name {name} -> -22" in out, name               # EINVAL
    assert "oversized name -> -36" in out                           # ENAMETOOLONG
    assert "name without NUL -> -22" in out
    assert f"readlink escape_abs = {secret}" in out
    assert "readlink escape_rel = ../secret" in out
    for link in ("escape_abs", "escape_rel"):
        assert f"{link} open -> -40" in out                          # ELOOP: never followed
        assert f"{link} lookup through -> -20" in out                # ENOTDIR
    assert "inside_link is a symlink to hello.txt" in out
    assert "readlink of a file -> -22" in out
    assert "getattr after a short batch forget -> 0" in out
    assert "getattr after batch forget -> -2" in out
    assert secret.read_text() == "host secret\n"


def test_fs_read_create_write_and_confinement(native, tmp_path):
    share, secret = _share(tmp_path)
    vm, out = _run(native, share, read_only=False)
    try:
        counters = _assert_ok(vm, out)
        assert "tag hostshare request queues 1" in out
        assert f"read hello.txt {len(HELLO_TEXT)} bytes, content ok" in out
        assert "unknown opcode -> -38" in out and "garbage header -> -22" in out
        _assert_names_and_links_confined(out, secret)
        # host side: the guest's file landed in the share, nothing left it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "share"]
        assert counters["bytes_read"] == len(HELLO_TEXT)
        assert counters["bytes_written"] == len(OUT_TEXT)
        # bad names: 5 lookups, mkdir ../up, symlink a/b, link .., rename ../moved,
        # unlink ../secret, rmdir ..
        assert counters["escape_refusals"] == 11
        assert counters["unsupported_opcodes"] == 1  # the unknown one
        assert counters["malformed_requests"] >= 2  # request before INIT + garbage header
        assert counters["read_only_refusals"] == 0
        assert counters["ops"] >= 20 and counters["errors"] >= 8
    finally:
        vm.close()


def test_fs_namespace_ops_change_the_host_folder(native, tmp_path):
    """SETATTR (chmod, truncate, utimes), fallocate, fsync, lseek, statfs, mkdir, mknod,
    symlink, link, rename, rename2, unlink, rmdir — each seen on the host, and each edge case
    Linux never produces answered as it should (see the probe's expectations)."""
    share, secret = _share(tmp_path)
    vm, out = _run(native, share, read_only=False)
    try:
        counters = _assert_ok(vm, out)
        sub = share / "sub"
        moved = sub / "renamed"           # out.txt -> sub/moved -> sub/renamed
        assert not (share / "out.txt").exists() and not (sub / "moved").exists()
        st = os.stat(moved)
        assert st.st_size == 8192                                   # truncated to 7, fallocated
        assert moved.read_bytes()[:7] == OUT_TEXT.encode()[:7]
        assert stat.S_IMODE(st.st_mode) == 0o755                    # chmod 04755: bits stripped
        assert "chmod result mode 0755" in out
        assert int(st.st_mtime) == MTIME_2001
        assert st.st_nlink == 2 and os.stat(sub / "hard").st_ino == st.st_ino
        assert "utimes nsec 1e9 -> -22" in out and "setattr short -> -22" in out
        assert "chown to another uid -> -1" in out and "chown to the same uid -> 0" in out
        assert st.st_uid == os.getuid()
        assert "truncate setuid_host -> -1" in out
        assert (share / "setuid_host").read_bytes() == SETUID_TEXT
        assert "fallocate collapse -> -95" in out and "fallocate past 2^63 -> -22" in out
        assert "fsync unknown handle -> -9" in out and "lseek SEEK_SET -> -22" in out
        with open(share / "sparse.bin", "rb") as sparse:             # what the host itself says
            data = os.lseek(sparse.fileno(), 0, os.SEEK_DATA)
            hole = os.lseek(sparse.fileno(), 0, os.SEEK_HOLE)
        assert f"sparse.bin data at {data}\n" in out and f"sparse.bin hole at {hole}\n" in out
        assert data == SPARSE_HOLE_BYTES        # ext4/tmpfs report the hole: not a vacuous check
        vfs = os.statvfs(share)
        assert f"statfs bsize {vfs.f_bsize} namelen {vfs.f_namemax} " in out
        assert sub.is_dir() and stat.S_IMODE(os.stat(sub).st_mode) == 0o755   # 042777 & ~022
        assert "mkdir ../up -> -22" in out and "mkdir sub again -> -17" in out
        assert not (tmp_path / "up").exists()
        assert stat.S_ISFIFO(os.lstat(sub / "fifo").st_mode)
        assert os.readlink(share / "out_link") == "/etc"            # stored, never followed
        assert "lookup through new symlink -> -20" in out
        assert "symlink oversized target -> -36" in out and not (share / "long").exists()
        assert "link unknown node -> -2" in out
        assert "rename to ../moved -> -22" in out and not (tmp_path / "moved").exists()
        assert "rename into a symlink to /etc -> -20" in out and not os.path.exists("/etc/moved")
        assert "rename to unknown node -> -2" in out
        assert "rename2 noreplace onto hard -> -17" in out and "rename2 exchange -> -22" in out
        assert not (share / "rmme").exists() and not (share / "emptydir").exists()
        assert secret.read_text() == "host secret\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "share"]
        assert counters["syncs"] == 3 and counters["fallocates"] == 1 and counters["seeks"] == 2
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
        assert "mknod chardev -> -1" in out
        for name in ("chardev", "blockdev", "mknod_dev"):
            assert not os.path.lexists(share / name)
        assert not any(stat.S_ISCHR(m) or stat.S_ISBLK(m)
                       for m in (os.lstat(p).st_mode for p in share.iterdir()))
        for what in ("open-for-write", "open-truncate", "create-truncate"):
            assert f"{what} setuid_host -> -1" in out
        assert "open-read setuid_host -> 0" in out
        assert (share / "setuid_host").read_bytes() == SETUID_TEXT
        assert stat.S_IMODE(os.stat(share / "setuid_host").st_mode) == 0o4755
        # 2 device CREATEs, MKNOD, 3 setuid_host write-opens, its truncate, one chown
        assert counters["privilege_refusals"] == 8
    finally:
        vm.close()


def test_fs_read_only_refuses_writes_host_side(native, tmp_path):
    share, secret = _share(tmp_path)
    before = {p.name: os.lstat(p) for p in share.iterdir()}
    vm, out = _run(native, share, read_only=True)
    try:
        counters = _assert_ok(vm, out)
        assert "write read-only -> -30" in out
        assert "open-for-write read-only -> -30" in out
        assert "create out.txt -> -30" in out
        for op in ("truncate", "mkdir", "unlink", "rmdir", "rename", "symlink", "link",
                   "fallocate"):
            assert f"ro {op} -> -30" in out, op
        assert "ro statfs -> 0" in out
        after = {p.name: os.lstat(p) for p in share.iterdir()}
        assert after.keys() == before.keys()
        assert all((after[n].st_size, after[n].st_mtime_ns, after[n].st_mode)
                   == (before[n].st_size, before[n].st_mtime_ns, before[n].st_mode)
                   for n in before)
        assert (share / "hello.txt").read_text() == HELLO_TEXT
        assert counters["read_only_refusals"] == 11
        assert counters["bytes_written"] == 0 and counters["bytes_read"] == len(HELLO_TEXT)
        _assert_names_and_links_confined(out, secret)
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
        assert status.dax_note.startswith("no DAX window in the native core")
        assert status.counters.bytes_read == len(HELLO_TEXT)
        assert status.counters.bytes_written == len(OUT_TEXT)
        assert status.counters.ops >= 20
    finally:
        vm.close()
