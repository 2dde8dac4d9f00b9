"""Host paths reach QEMU and virtiofsd escaped, and guest root gets no host privilege out of a
read-write mount (real guests under QEMU, plus the seccomp filter on its own).

A path is never spliced into another program's option string unescaped: QEMU splits
``-drive``/``-chardev``/``-object`` at commas (a later ``file=`` or ``path=`` wins), virtiofsd's
``-o`` parser (libfuse's fuse_opt) at commas too, with backslash escapes (``\\101`` is ``A``).
The path tests name a directory or file so that its unescaped spelling selects a *decoy*, and
check that the guest sees exactly the intended one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supermachine_jupyter import Image, VmConfig
from supermachine_jupyter.engines.qemu.engine import qemu_opt
from supermachine_jupyter.engines.qemu.seccomp import no_setid_installer
from supermachine_jupyter.engines.qemu.virtiofsd import fuse_opt_value
from supermachine_jupyter.engines.process import spawn_owned

QEMU = VmConfig(engine="qemu")


@pytest.fixture(scope="module")
def image():
    return Image.default()


def _dir_with(path: Path, *names: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text(f"{name}\n")
    return path


def _ls(vm, guest_path: str) -> list[str]:
    result = vm.run(f"ls -A {guest_path}")
    assert result.ok, result
    return sorted(result.stdout.split())


# -- the escaping helpers ------------------------------------------------------------------

def test_option_value_escapes():
    assert qemu_opt("/a,b=c\\d e") == "/a,,b=c\\d e"
    assert qemu_opt(Path("/x,,y")) == "/x,,,,y"
    assert fuse_opt_value("/a,source=/etc") == "/a\\,source=/etc"
    assert fuse_opt_value("/oct\\101,x\\") == "/oct\\\\101\\,x\\\\"


# -- paths with commas, '=', backslashes and spaces ------------------------------------------

def test_mount_paths_with_commas_and_backslashes_share_exactly_that_directory(image, tmp_path):
    decoy = _dir_with(tmp_path / "decoy", "DECOY")
    # Unescaped, "-o source=<tmp>/x,source=<decoy>" shares the decoy (the last source= wins).
    comma = _dir_with(Path(f"{tmp_path}/x,source={decoy}"), "comma-ok")
    # Unescaped, fuse_opt reads "\101" as the octal escape for "A": it would share "octA".
    _dir_with(tmp_path / "octA", "DECOY-OCTAL")
    octal = _dir_with(tmp_path / "oct\\101", "octal-ok")
    odd = _dir_with(tmp_path / "sp ace=eq\\back,comma\\", "odd-ok")
    config = (QEMU.with_virtiofs(str(comma), "comma", "/mnt/comma")
              .with_virtiofs(str(octal), "octal", "/mnt/octal")
              .with_virtiofs(str(odd), "odd", "/mnt/odd", read_only=True))
    with image.start(config) as vm:
        assert _ls(vm, "/mnt/comma") == ["comma-ok"]
        assert _ls(vm, "/mnt/octal") == ["octal-ok"]
        assert _ls(vm, "/mnt/odd") == ["odd-ok"]
        assert vm.run("echo guest > /mnt/comma/new && cat /mnt/odd/odd-ok").stdout == "odd-ok\n"
    assert (comma / "new").read_text() == "guest\n"
    assert sorted(os.listdir(decoy)) == ["DECOY"]


def test_volume_path_with_comma_attaches_that_file(image, tmp_path):
    # A decoy ext4 image with a marker file; unescaped, "-drive file=<tmp>/v,file=<decoy>"
    # attaches it (QEMU takes the last file=).
    marker_dir = _dir_with(tmp_path / "marker", "DECOY")
    decoy = tmp_path / "decoy.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(marker_dir), str(decoy), "16M"],
                   check=True)
    decoy_digest = hashlib.sha256(decoy.read_bytes()).hexdigest()
    intended = Path(f"{tmp_path}/v,file={decoy}")
    intended.parent.mkdir(parents=True)
    with image.start(QEMU.with_volume(str(intended), "/data", size_mib=16)) as vm:
        assert "DECOY" not in _ls(vm, "/data")
        assert vm.run("echo intended > /data/id && sync").ok
    assert hashlib.sha256(decoy.read_bytes()).hexdigest() == decoy_digest
    with image.start(QEMU.with_volume(str(intended), "/data", size_mib=16)) as vm:
        assert vm.run("cat /data/id").stdout == "intended\n"


def test_run_dir_with_comma_holds_the_vm_sockets(image, tmp_path):
    """vsock_mux_dir (user-set) holds the run dir: QMP, agent and virtiofsd sockets."""
    mux = tempfile.mkdtemp(prefix="smi,path=x\\y ", dir="/tmp")
    share = _dir_with(tmp_path / "share", "hello")
    try:
        config = VmConfig(engine="qemu", vsock_mux_dir=mux).with_virtiofs(str(share), "share",
                                                                           "/mnt/share")
        with image.start(config) as vm:
            assert vm.run("cat /mnt/share/hello").stdout == "hello\n"
            assert vm.instance.qmp().execute("query-status")["running"]
    finally:
        shutil.rmtree(mux, ignore_errors=True)


# -- no host privilege out of a read-write mount ---------------------------------------------

SETID = stat.S_ISUID | stat.S_ISGID


def _privileged_leftovers(root: Path) -> list[str]:
    """Set-user-ID/set-group-ID files and device nodes under ``root`` (host side)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            if device or (not stat.S_ISDIR(mode) and mode & SETID):
                found.append(f"{path} {oct(mode)}")
    return found


def test_guest_root_cannot_leave_setuid_files_or_device_nodes(image, tmp_path):
    share = _dir_with(tmp_path / "share", "hello")
    attempts = {
        "chmod u+s": "cp /bin/busybox /mnt/x/s && chmod 4755 /mnt/x/s",
        "chmod g+s": "chmod 2755 /mnt/x/s",
        "chmod symbolic": "chmod u+s,g+s /mnt/x/s",
        # create with the mode already set (cp -p and tar -p create with the source's mode)
        "cp -p": "cp /bin/busybox /tmp/t && chmod 4755 /tmp/t && cp -p /tmp/t /mnt/x/p",
        "tar -p": "cd /tmp && tar -cf /tmp/t.tar t && cd /mnt/x && tar -xpf /tmp/t.tar",
        "mknod c": "mknod /mnt/x/mem c 1 1",
        "mknod b": "mknod /mnt/x/loop b 7 0",
    }
    with image.start(QEMU.with_virtiofs(str(share), "x", "/mnt/x")) as vm:
        for what, command in attempts.items():
            result = vm.run(command)
            assert result.exit_code != 0, (what, result)
            assert "not permitted" in result.stderr, (what, result)
        # Ordinary work still goes through.
        ok = vm.run("set -e; cd /mnt/x; echo data > f; cat f; chmod 755 f; chmod 1777 .; "
                    "mkdir d; mkfifo d/fifo; ln -s f link; mv f g; cat link 2>/dev/null || "
                    "cat g; rm g; cat hello")
        assert ok.ok and ok.stdout == "data\ndata\nhello\n", ok
    assert _privileged_leftovers(share) == []
    assert stat.S_IMODE(os.stat(share / "s").st_mode) == 0o755   # copied, bits refused
    assert stat.S_ISFIFO(os.lstat(share / "d" / "fifo").st_mode)


def test_guest_root_writing_a_host_setuid_file_clears_its_bits(image, tmp_path):
    """A set-user-ID program already in the share: guest root may rewrite it (it is root), but
    then it is no longer set-user-ID on the host (virtiofsd runs without CAP_FSETID)."""
    share = _dir_with(tmp_path / "share", "append", "overwrite", "truncate")
    for name in ("append", "overwrite", "truncate"):
        os.chmod(share / name, 0o6755)
    with image.start(QEMU.with_virtiofs(str(share), "x", "/mnt/x")) as vm:
        result = vm.run("echo x >> /mnt/x/append; echo x > /mnt/x/overwrite; "
                        "truncate -s 0 /mnt/x/truncate")
        assert result.ok, result
    assert (share / "append").read_text() == "append\nx\n"
    assert _privileged_leftovers(share) == []


# -- the filter itself, without a VM ---------------------------------------------------------

FILTER_PROBE = r"""
import errno, os, sys
d = sys.argv[1]
def attempt(name, call):
    try:
        result = call()
        if isinstance(result, int) and result > 2:
            os.close(result)
        print(name, "ok")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
attempt("create 644", lambda: os.open(d + "/f", os.O_CREAT | os.O_WRONLY, 0o644))
attempt("chmod 755", lambda: os.chmod(d + "/f", 0o755))
attempt("chmod 1755", lambda: os.chmod(d + "/f", 0o1755))
attempt("chmod 4755", lambda: os.chmod(d + "/f", 0o4755))
attempt("chmod 2755", lambda: os.chmod(d + "/f", 0o2755))
attempt("fchmod 4755", lambda: os.fchmod(os.open(d + "/f", os.O_RDONLY), 0o4755))
attempt("open 4755 no O_CREAT", lambda: os.open(d + "/f", os.O_RDONLY, 0o4755))
attempt("create 4755", lambda: os.open(d + "/s", os.O_CREAT | os.O_WRONLY, 0o4755))
attempt("tmpfile 2755", lambda: os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o2755))
attempt("mknod c", lambda: os.mknod(d + "/c", 0o20644, os.makedev(1, 3)))
attempt("mknod b", lambda: os.mknod(d + "/b", 0o60644, os.makedev(7, 0)))
attempt("mknod reg 4755", lambda: os.mknod(d + "/r", 0o104755))
attempt("mkfifo", lambda: os.mkfifo(d + "/p"))
attempt("setxattr", lambda: os.setxattr(d + "/f", "user.x", b"1"))
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def raw(name, nr, *args):
    rc = libc.syscall(nr, *args)
    print(name, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])
raw("x32 chmod 644", 0x40000000 | 90, (d + "/f").encode(), 0o644)
raw("openat2", 437, -100, (d + "/o").encode(), None, 0)
raw("chmod 4755 high bits set", 90, (d + "/f").encode(), ctypes.c_ulong(0o4755 | 1 << 40))
"""


def test_seccomp_filter_refuses_setid_modes_device_nodes_and_xattrs(tmp_path):
    proc = spawn_owned([sys.executable, "-c", FILTER_PROBE, str(tmp_path)],
                       child_setup=no_setid_installer(), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    results = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert results == {
        "create 644": "ok", "chmod 755": "ok", "chmod 1755": "ok", "chmod 4755": "EPERM",
        "chmod 2755": "EPERM", "fchmod 4755": "EPERM", "open 4755 no O_CREAT": "ok",
        "create 4755": "EPERM", "tmpfile 2755": "EPERM", "mknod c": "EPERM",
        "mknod b": "EPERM", "mknod reg 4755": "EPERM", "mkfifo": "ok", "setxattr": "EPERM",
        "x32 chmod 644": "EPERM", "openat2": "ENOSYS", "chmod 4755 high bits set": "EPERM",
    }, out
    assert sorted(os.listdir(tmp_path)) == ["f", "p"]
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o1755


def test_snapshot_under_a_path_with_commas_saves_and_restores(image, tmp_path):
    """The snapshot helper's -object memory-backend-file,mem-path= and a restore's -drive
    (volume copies and overlays inside the snapshot directory) with a comma in the path."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    where = Path(f"{tmp_path}/snap,mem-path={decoy}/s")
    where.parent.mkdir(parents=True)
    config = QEMU.with_volume(str(tmp_path / "vol.img"), "/data", size_mib=16)
    with image.start(config) as vm:
        assert vm.run("echo kept > /data/v; echo 42 > /dev/shm/mem; sync").ok
        snap = vm.snapshot(where)
    with Image.from_snapshot(snap.path).start(QEMU) as restored:
        assert restored.run("cat /data/v /dev/shm/mem").stdout == "kept\n42\n"
    assert os.listdir(decoy) == []
