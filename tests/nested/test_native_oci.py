"""An OCI image's root file system booted on the native core with our Linux guest (issue L on
the main path: ``engine="auto"`` picks the native core wherever KVM runs Linux).

Pulling is the same on every engine and is tested on the host (``tests/test_oci_pull.py``);
what the engine changes is the boot: the image's ext4 file attached read-only as one more
virtio-blk disk, init switching root onto it under a tmpfs overlay, the agent from the
initramfs, and a snapshot that refers to the image file instead of copying it. The image here
is a small tree of Debian's static busybox turned into ext4 with ``mkfs.ext4 -d`` inside L1
(a registry and umoci at TCG speed would cost minutes and test nothing engine-specific).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from supermachine_jupyter import VmConfig
from supermachine_jupyter.guest.rootfs import ImageRootfs
from supermachine_jupyter.image import Image

from tests.nested.helpers import start_native

pytestmark = pytest.mark.nested_kvm

NATIVE = VmConfig(engine="native")


def _busybox_image(where: Path) -> ImageRootfs:
    tree = where / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    os.chmod(tree / "bin/busybox", 0o755)
    for applet in ("sh", "id", "pwd", "cat", "echo", "env", "ls", "mount", "sync", "nproc"):
        (tree / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "root", "tmp", "proc", "sys", "dev", "srv/app", "home/bob"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\nbob:x:1001:\n")
    (tree / "etc/image-marker").write_text("from the image\n")
    rootfs = where / "rootfs.ext4"
    with open(rootfs, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "--", str(rootfs)], check=True,
                   capture_output=True)
    os.chmod(rootfs, 0o444)
    digest = "sha256:" + hashlib.sha256(rootfs.read_bytes()).hexdigest()
    return ImageRootfs(ref="nested/busybox:test", digest=digest, rootfs=rootfs,
                       env=("PATH=/bin", "GREETING=hi from the image"), working_dir="/srv/app",
                       user="bob")


def test_native_core_boots_an_image_root_and_restores_it(tmp_path):
    rootfs = _busybox_image(tmp_path)
    digest_before = hashlib.sha256(rootfs.rootfs.read_bytes()).hexdigest()
    with start_native(Image.from_rootfs(rootfs), NATIVE, name="nested-oci") as vm:
        out = vm.run('cat /etc/image-marker; id -u; pwd; echo "$GREETING"')
        assert out.exit_code == 0, (out.stdout, out.stderr, vm.console_output()[-3000:])
        assert out.stdout.splitlines() == ["from the image", "1001", "/srv/app",
                                           "hi from the image"]
        # the image is the root, read-only beneath a writable layer of this VM's own
        mounts = vm.run("cat /proc/mounts", user="root").stdout
        assert any(line.split()[:3] == ["overlay", "/", "overlay"]
                   for line in mounts.splitlines()), mounts
        assert vm.run("echo written > /etc/image-marker && sync", user="root").ok
        assert vm.run("cat /etc/image-marker").stdout == "written\n"
        vm.snapshot(tmp_path / "snap")
    assert hashlib.sha256(rootfs.rootfs.read_bytes()).hexdigest() == digest_before
    assert not any(p.stat().st_size >= rootfs.rootfs.stat().st_size
                   for p in (tmp_path / "snap").iterdir() if p.name != "memory.bin"), \
        "the snapshot holds a copy of the image's root file system"
    # the restored VM continues on the same image file, with the snapshot's writable layer
    with Image.from_snapshot(tmp_path / "snap").start(NATIVE, name="nested-oci-restored") as vm:
        assert vm.run("cat /etc/image-marker").stdout == "written\n"
        assert vm.run("id -u").stdout == "1001\n"
    # and a new VM of the image starts from the image as it is
    with start_native(Image.from_rootfs(rootfs), NATIVE, name="nested-oci-2") as vm:
        assert vm.run("cat /etc/image-marker").stdout == "from the image\n"
