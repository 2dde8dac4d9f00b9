"""Test images for booting OCI root file systems, until the real puller (``guest/oci.py``,
registry → skopeo → umoci → ext4) is merged: a directory tree turned into an ext4 file with
``mkfs.ext4 -d`` and wrapped in an :class:`ImageRootfs`, as ``oci.pull`` would return it.

* ``busybox_rootfs()``: Debian's static busybox and its applet links (a few MiB);
* ``toolless_rootfs()``: no programs at all (as a distroless image without a shell): only
  what the host's own steps may use is the initramfs's busybox in ``/.supermachine``;
* ``python_rootfs()``: ``mmdebstrap --variant=extract`` of python3-minimal, dash and coreutils
  from this machine's apt sources (~45 MiB, ~25 s to build).

Both have a non-root user ``alice`` (uid 1000, group 1000, also in group ``staff`` 50), a
working directory ``/srv/app`` and an ``Env`` with ``GREETING``. The ext4 files are cached in
the user cache dir, keyed by their recipe and the Debian versions that went in, so a second
run of the suite builds nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from supermachine_jupyter.guest.assets import cache_dir
from supermachine_jupyter.guest.rootfs import ImageRootfs

RECIPE_VERSION = "1"
PYTHON_PACKAGES = ("python3-minimal", "dash", "coreutils")
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n")
GROUP = "root:x:0:\nstaff:x:50:alice\nalice:x:1000:\n"
ENV = ("PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello from the image")
WORKING_DIR = "/srv/app"
USER = "alice"


def _package_version(package: str) -> str:
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", "--", package],
                         capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Version:")), "?")


def _finish_tree(root: Path) -> None:
    """What every test image has: passwd/group with alice, her home, the working dir."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for d in ("root", "tmp", "proc", "sys", "dev", "home/alice", "srv/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home/alice", 1000, 1000)
    (root / "srv/app/README").write_text("the image's working directory\n")


def _mkfs(tree: Path, out: Path) -> None:
    """ext4 of ``tree``, sized for it plus some room, written atomically, read-only."""
    used = sum(p.lstat().st_size for p in tree.rglob("*")) // (1024 * 1024)
    size_mib = used + used // 3 + 16
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "testimage", "-d", str(tree), "--",
                    str(tmp)], check=True, capture_output=True)
    os.chmod(tmp, 0o444)
    os.replace(tmp, out)


def _cached(name: str, key_inputs: list[str], build_tree) -> Path:
    key = hashlib.sha256("\0".join([RECIPE_VERSION, PASSWD, GROUP, *key_inputs])
                         .encode()).hexdigest()[:16]
    out = cache_dir() / "test-images" / f"{name}-{key}.ext4"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=out.parent) as work:
            tree = Path(work) / "root"
            build_tree(tree)
            _finish_tree(tree)
            _mkfs(tree, out)
    return out


def _image(ref: str, path: Path, **overrides) -> ImageRootfs:
    # Stands in for the manifest digest: the same file gives the same "digest".
    digest = "sha256:" + hashlib.sha256(path.name.encode()).hexdigest()
    fields = {"ref": ref, "digest": digest, "rootfs": path, "env": ENV,
              "working_dir": WORKING_DIR, "user": USER, **overrides}
    return ImageRootfs(**fields)


def busybox_rootfs(**overrides) -> ImageRootfs:
    busybox = Path("/bin/busybox")

    def build(tree: Path) -> None:
        (tree / "bin").mkdir(parents=True)
        shutil.copy2(busybox, tree / "bin/busybox")
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (tree / "bin" / applet).symlink_to("busybox")

    path = _cached("busybox", [hashlib.sha256(busybox.read_bytes()).hexdigest()], build)
    return _image("test/busybox:latest", path, **overrides)


def toolless_rootfs(**overrides) -> ImageRootfs:
    path = _cached("toolless", [], lambda tree: tree.mkdir())
    return _image("test/toolless:latest", path, **overrides)


def python_rootfs(**overrides) -> ImageRootfs:
    def build(tree: Path) -> None:
        if shutil.which("mmdebstrap") is None:
            raise RuntimeError("mmdebstrap is not installed: apt-get install mmdebstrap")
        result = subprocess.run(
            ["mmdebstrap", "--mode=root", "--variant=extract",
             f"--include={','.join(PYTHON_PACKAGES)}", "--quiet", "bookworm", str(tree)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed: {result.stderr[-2000:]}")

    versions = [f"{p}={_package_version(p)}" for p in PYTHON_PACKAGES]
    path = _cached("python", versions, build)
    return _image("test/python:3-minimal", path, **overrides)
