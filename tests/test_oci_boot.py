"""Booting OCI images' root file systems with our kernel and agent (issue L), on QEMU/TCG
with real VMs: the image read-only under a per-VM writable layer, its config (Env,
WorkingDir, User, Entrypoint + Cmd) honoured, volumes and mounts inside it, one pre-booted
snapshot per image digest, and ``%%vm --image REF python3`` cells.

The images come from ``tests/image_rootfs.py`` (mkfs.ext4 -d of a tree built from Debian
packages, cached in the user cache) until the puller (``guest/oci.py``) is merged: where a
test goes through ``Image.from_oci``/``%%vm --image``, ``oci.pull`` is replaced by a stand-in
returning that ImageRootfs (the pull is the other half of the issue and has its own tests;
everything from the ImageRootfs on is real).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from supermachine_jupyter.config import MountSpec, VmConfig, VolumeSpec
from supermachine_jupyter.errors import ImageError, SnapshotError, VmError
from supermachine_jupyter.image import Image
from supermachine_jupyter.snapshots import cache, store
from supermachine_jupyter.devices.rootfs import GUEST_BUSYBOX
from tests.image_rootfs import busybox_rootfs, python_rootfs, toolless_rootfs

if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
                allow_module_level=True)
if shutil.which("mmdebstrap") is None or shutil.which("mkfs.ext4") is None:
    pytest.skip("the test images need mmdebstrap and e2fsprogs (make test installs them)",
                allow_module_level=True)

PY_ENTRYPOINT = ("python3", "-c")
PY_CMD = ("import os; print('service up as', os.getuid(), os.getcwd())",)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def py_rootfs():
    return python_rootfs(entrypoint=PY_ENTRYPOINT, cmd=PY_CMD)


@pytest.fixture(scope="module")
def image_vm(py_rootfs, tmp_path_factory):
    """One VM of the Python image with a volume and a virtio-fs mount, shared by the tests
    that only look at it or write where nothing else looks."""
    tmp = tmp_path_factory.mktemp("oci")
    share = tmp / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("host says hi\n")
    config = VmConfig(engine="qemu", volumes=[VolumeSpec(str(tmp / "data.img"), "/data")],
                      mounts=[MountSpec(str(share), "share", "/mnt/share")])
    before = sha256(py_rootfs.rootfs), py_rootfs.rootfs.stat().st_mtime_ns
    vm = Image.from_rootfs(py_rootfs).start(config, name="oci-py")
    yield types.SimpleNamespace(vm=vm, share=share, before=before, rootfs=py_rootfs)
    vm.stop(timeout=5)


def lines(result) -> list[str]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.splitlines()


def test_python_runs_in_the_image(image_vm):
    out = lines(image_vm.vm.run("python3 -c 'import sys; print(sys.version)'"))
    assert out[0].startswith("3.11."), out
    assert "image=test/python:3-minimal@sha256:" in repr(image_vm.vm)


def test_image_env_workdir_and_user_are_the_defaults(image_vm):
    out = lines(image_vm.vm.run('id -u; id -g; id -G; pwd; echo "$GREETING"; echo "$HOME"'))
    assert out[0:2] == ["1000", "1000"]
    assert set(out[2].split()) == {"1000", "50"}          # alice's supplementary group staff
    assert out[3:] == ["/srv/app", "hello from the image", "/home/alice"]


def test_caller_overrides_the_image_config(image_vm):
    out = lines(image_vm.vm.run('id -u; id -g; pwd; echo "$GREETING"', user="root", cwd="/tmp",
                                env={"GREETING": "mine"}))
    assert out == ["0", "0", "/tmp", "mine"]
    out = lines(image_vm.vm.run("id -u; id -g", user="4242"))   # a uid not in /etc/passwd
    assert out == ["4242", "0"]
    out = lines(image_vm.vm.run("id -u; id -g", user="alice:staff"))
    assert out == ["1000", "50"]


def test_unknown_user_or_group_is_a_clear_error(image_vm):
    with pytest.raises(VmError, match="user 'mallory' not found in the image's /etc/passwd"):
        image_vm.vm.run("true", user="mallory")
    with pytest.raises(VmError, match="group 'wheel' .*not found in the image's /etc/group"):
        image_vm.vm.run("true", user="alice:wheel")
    assert image_vm.vm.run("echo still fine").stdout == "still fine\n"


def test_writes_to_root_stay_in_the_vm_and_never_reach_the_image_file(image_vm):
    vm = image_vm.vm
    out = lines(vm.run("echo scribble > /etc/scribble && rm /srv/app/README && "
                       "cat /etc/scribble && ls /srv/app | wc -l && sync", user="root"))
    assert out == ["scribble", "0"]
    assert image_vm.before == (sha256(image_vm.rootfs.rootfs),
                               image_vm.rootfs.rootfs.stat().st_mtime_ns)


def test_agent_lives_in_a_read_only_hidden_dir(image_vm):
    result = image_vm.vm.run("ls /.supermachine; touch /.supermachine/x", user="root")
    assert "supermachine-agent" in result.stdout and "busybox" in result.stdout
    assert result.exit_code != 0 and "Read-only file system" in result.stderr


def test_volumes_and_mounts_inside_the_image(image_vm):
    out = lines(image_vm.vm.run("cat /mnt/share/from-host.txt && echo vol > /data/x && "
                                "cat /data/x && echo back > /mnt/share/from-guest.txt",
                                user="root"))
    assert out == ["host says hi", "vol"]
    assert (image_vm.share / "from-guest.txt").read_text() == "back\n"
    assert [v["guest_path"] for v in image_vm.vm.volumes()] == ["/data"]


def test_run_image_command_runs_entrypoint_and_cmd(image_vm):
    proc = image_vm.vm.run_image_command(log_path="/tmp/service.log")
    out = []
    proc.wait(timeout=60, on_stdout=out.append)
    assert b"".join(out).decode() == "service up as 1000 /srv/app\n"
    assert image_vm.vm.read_file("/tmp/service.log") == b"service up as 1000 /srv/app\n"


def test_missing_or_damaged_rootfs_is_a_clear_error(tmp_path):
    gone = busybox_rootfs(rootfs=tmp_path / "gone.ext4")
    with pytest.raises(ImageError, match=r"test/busybox:latest .*gone\.ext4 does not exist"):
        Image.from_rootfs(gone).start(VmConfig(engine="qemu"))
    junk = tmp_path / "junk.ext4"
    junk.write_bytes(b"\0" * 65536)
    with pytest.raises(ImageError, match="holds no ext4 file system"):
        Image.from_rootfs(busybox_rootfs(rootfs=junk)).start(VmConfig(engine="qemu"))


def test_corrupt_ext4_fails_the_boot_saying_so(tmp_path):
    # The superblock is intact (the host's check passes) but the file system is cut short:
    # the guest's init cannot mount it and says which disk and what to do.
    broken = tmp_path / "broken.ext4"
    with open(busybox_rootfs().rootfs, "rb") as f:
        broken.write_bytes(f.read(2 * 1024 * 1024))
    with pytest.raises(VmError, match="cannot mount the image's root file system .*pull the "
                                      "image again"):
        Image.from_rootfs(busybox_rootfs(rootfs=broken)).start(VmConfig(engine="qemu"),
                                                               boot_timeout=60)


def test_second_start_restores_the_per_digest_snapshot(tmp_path, monkeypatch):
    """The pre-booted snapshot of an image references its rootfs file (never copies it), a
    restore gets a fresh writable layer and is made the guest's own (hostname, clock) even in
    an image without a single program, and a restore whose rootfs file is gone is refused
    naming it."""
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path / "snaps")
    (tmp_path / "snaps").mkdir()
    copy = tmp_path / "toolless.ext4"
    shutil.copyfile(toolless_rootfs().rootfs, copy)
    image = Image.from_rootfs(toolless_rootfs(rootfs=copy))
    config = VmConfig(engine="qemu")
    sh = [GUEST_BUSYBOX, "sh", "-c"]       # the image has no shell: the initramfs's busybox
    with image.start(config, name="first", snapshot_cache=True) as first:
        assert first.restored_from is None
        assert first.run(argv=[*sh, "echo mine > /etc/mark"], user="root").exit_code == 0
        with pytest.raises(VmError, match="exec /bin/sh: No such file or directory"):
            first.run("true")                # really no shell in it
    assert cache.wait_for_background(timeout=60)
    with image.start(config, name="second", snapshot_cache=True) as second:
        assert second.restored_from is not None
        assert "restored_from=" in repr(second)
        out = lines(second.run(argv=[*sh, "cat /etc/mark 2>&1; id -un; pwd; hostname"]))
        assert out[0].endswith("No such file or directory") and out[1:] == [
            "alice", "/srv/app", "second"]
    snapshot_dir = second.restored_from
    # The snapshot holds guest RAM and state, not the image's disk: it names the file.
    from supermachine_jupyter.snapshots.format import Snapshot
    header = Snapshot.open(snapshot_dir).header
    assert header["volumes"] == [] and header["rootfs"]["rootfs"] == str(copy)
    assert header["rootfs"]["digest"] == image.rootfs.digest
    assert not any(f.name.startswith("volume") for f in snapshot_dir.iterdir())
    copy.unlink()
    with pytest.raises(SnapshotError, match=r"toolless\.ext4 does not exist"):
        Image.from_snapshot(snapshot_dir).start(VmConfig())


@pytest.fixture
def ip_with_images(py_rootfs, monkeypatch, tmp_path):
    """An IPython shell with the magics, pre-booted snapshots in ``tmp_path``, and
    ``oci.pull`` standing in for the registry with the test image (see the module doc)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    import supermachine_jupyter.guest as guest_pkg
    pulls = []

    def pull(ref, *, pull="missing", progress=None, auth_file=None, tls_verify=None):
        pulls.append((ref, pull))
        if ref != py_rootfs.ref:
            from supermachine_jupyter.errors import ImageError
            raise ImageError(f"image {ref}: not found (the test registry has only "
                             f"{py_rootfs.ref})")
        return py_rootfs

    stand_in = types.ModuleType("supermachine_jupyter.guest.oci")
    stand_in.pull = pull
    monkeypatch.setitem(sys.modules, "supermachine_jupyter.guest.oci", stand_in)
    monkeypatch.setattr(guest_pkg, "oci", stand_in, raising=False)
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path)
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    shell.pulls = pulls
    yield shell
    shell.run_line_magic("vm", "stop --all")


def test_vm_image_cells_with_python_restore_and_named_vms(ip_with_images, capsys):
    ip = ip_with_images
    ref = "test/python:3-minimal"
    ip.run_cell_magic("vm", f"--image {ref} --engine qemu python3",
                      "import os, sys\nprint('py', sys.version_info[0], os.getcwd(), os.getuid())\n")
    out = capsys.readouterr().out
    assert "py 3 /srv/app 1000" in out and "VM booted in" in out, out
    assert cache.wait_for_background(timeout=60)
    ip.run_cell_magic("vm", f"--image {ref} --engine qemu", "echo restored cell; id -un")
    out = capsys.readouterr().out
    assert "restored cell\nalice\n" in out and re.search(r"VM restored in \d", out), out
    # A named image VM keeps its files across cells; later cells need not repeat --image.
    ip.run_cell_magic("vm", f"--name keep1 --image {ref} --engine qemu --quiet python3",
                      "open('/home/alice/note', 'w').write('kept across cells')\n")
    ip.run_cell_magic("vm", "--name keep1 python3", "print(open('/home/alice/note').read())\n")
    assert "kept across cells" in capsys.readouterr().out
    assert f"image    {ref} (sha256:" in repr(ip.run_line_magic("vm", "info keep1"))
    assert ip.pulls == [(ref, "missing")] * 3
    from IPython.core.error import UsageError
    with pytest.raises(UsageError, match="--image no/such: image no/such: not found"):
        ip.run_cell_magic("vm", "--image no/such", "true")


def test_image_repr_names_ref_and_short_digest():
    image = Image.from_rootfs(busybox_rootfs())
    digest = image.rootfs.digest
    assert repr(image).startswith(f"Image(oci='test/busybox:latest', digest={digest[:19]},")
    assert digest[19:] not in repr(image)


def test_snapshot_record_of_the_rootfs_checks_the_very_file(tmp_path):
    """What a snapshot keeps of an image's disk: a record naming the file, refused at
    restore when the file is another file system now (made again: new UUID) or malformed."""
    from supermachine_jupyter.devices import rootfs
    copy = tmp_path / "image.ext4"
    shutil.copyfile(busybox_rootfs().rootfs, copy)
    image = busybox_rootfs(rootfs=copy)
    record = rootfs.to_record(image)
    assert rootfs.check_record(record) is None
    assert rootfs.from_record(record, "snap") == image
    with open(copy, "r+b") as f:          # the ext4 UUID, as another mkfs run would make it
        f.seek(1024 + 0x68)
        f.write(b"\x42" * 16)
    with pytest.raises(ImageError, match="has changed since .*make the snapshot again"):
        rootfs.from_record(record, "snap")
    assert "rootfs.env" in rootfs.check_record({**record, "env": "PATH=/bin"})
    assert "rootfs.size" in rootfs.check_record({**record, "size": True})
