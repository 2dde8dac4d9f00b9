"""Guest assets: the kernel and the initramfs every VM boots, whatever the engine.

Both are built on this machine from Debian packages and cached in the user cache dir
(``$XDG_CACHE_HOME`` or ``~/.cache``, then ``supermachine-jupyter/``), keyed by a hash of
their inputs, so a second build is a no-op:

* kernel: Debian's ``linux-source-6.1`` + ``native/guest/kernel.config`` merged onto
  ``make tinyconfig`` → ``bzImage`` (QEMU, native core) and ``vmlinux`` (PVH entry);
* initramfs: busybox from ``busybox-static``, our ``init`` and the static agent, packed
  reproducibly (sorted entries, mtime 0, uid/gid 0, ``gzip -n``) by :func:`pack_cpio`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import AssetError

# Bump when the build recipe changes in a way the hashed inputs do not show.
KERNEL_RECIPE_VERSION = "2"
INITRAMFS_RECIPE_VERSION = "2"

KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = Path("/bin/busybox")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def guest_source_dir() -> Path:
    """Where ``native/guest`` (kernel fragment, init, agent source) lives."""
    package = Path(__file__).resolve().parents[1]     # supermachine_jupyter/
    for candidate in (package.parent / "native" / "guest", package / "guest_src"):
        if (candidate / "kernel.config").is_file():
            return candidate
    raise AssetError(
        f"guest sources not found next to {package}: install the package from a source checkout "
        "(pip install -e .)"
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "supermachine-jupyter"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _debian_package_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status} ${Version}", package],
            capture_output=True, text=True, check=False,
        ).stdout
    except FileNotFoundError:
        return None
    parts = out.split()
    if len(parts) >= 4 and parts[2] == "installed":
        return parts[3]
    return None


def _apt_install(packages: list[str], progress: Progress) -> None:
    """Install Debian packages the build needs; the set-up commands rely on this."""
    missing = [p for p in packages if _debian_package_version(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise AssetError(
            f"missing Debian packages {' '.join(missing)}: run "
            f"`sudo apt-get install -y {' '.join(missing)}` and try again"
        )
    progress(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssetError(f"`{' '.join(cmd)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _sha256(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

KERNEL_BUILD_PACKAGES = [KERNEL_SOURCE_PACKAGE, "bc", "flex", "bison", "libelf-dev", "make",
                         "gcc", "xz-utils", "cpio"]


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    directory: Path
    bzimage: Path
    vmlinux: Path
    built_now: bool
    seconds: float


def kernel_key() -> str:
    fragment = (guest_source_dir() / "kernel.config").read_bytes()
    version = _debian_package_version(KERNEL_SOURCE_PACKAGE) or "not-installed"
    return _sha256([KERNEL_RECIPE_VERSION.encode(), b"\0", version.encode(), b"\0", fragment])[:16]


def _fragment_options(fragment: str) -> dict[str, str]:
    options = {}
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            options[key] = value
    return options


def _check_config(config_text: str, wanted: dict[str, str]) -> list[str]:
    """Options of the fragment that Kconfig dropped (unmet dependencies, typos)."""
    have = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            have[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:-len(" is not set")]] = "n"
    return [f"{k}={v} (got {have.get(k, 'unset')})" for k, v in wanted.items()
            if have.get(k, "n") != v]


@contextlib.contextmanager
def _build_lock(name: str, progress: Progress):
    """One builder per cache entry across processes (parallel tests, two notebooks)."""
    with open(cache_dir() / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"{name}: waiting for another process that is building it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_kernel(progress: Progress = _quiet, jobs: int | None = None) -> KernelBuild:
    """Return the cached kernel, building it first when the cache lacks it."""
    with _build_lock("kernel", progress):
        # Work trees of builds that were killed midway (we hold the lock: none is running).
        for stale in cache_dir().glob("kernel-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return _ensure_kernel_locked(progress, jobs)


def _ensure_kernel_locked(progress: Progress, jobs: int | None) -> KernelBuild:
    out_dir = cache_dir() / f"kernel-{kernel_key()}"
    bzimage, vmlinux = out_dir / "bzImage", out_dir / "vmlinux"
    if bzimage.is_file() and vmlinux.is_file():
        return KernelBuild(out_dir, bzimage, vmlinux, built_now=False, seconds=0.0)

    _apt_install(KERNEL_BUILD_PACKAGES, progress)
    key = kernel_key()  # the source package version is part of the key: recompute after install
    out_dir = cache_dir() / f"kernel-{key}"
    bzimage, vmlinux = out_dir / "bzImage", out_dir / "vmlinux"
    if bzimage.is_file() and vmlinux.is_file():
        return KernelBuild(out_dir, bzimage, vmlinux, built_now=False, seconds=0.0)

    started = time.monotonic()
    fragment_path = guest_source_dir() / "kernel.config"
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="kernel-build-", dir=cache_dir()) as work:
        work = Path(work)
        progress(f"kernel: unpacking {KERNEL_SOURCE_TARBALL.name}")
        _run(["tar", "-xf", str(KERNEL_SOURCE_TARBALL), "-C", str(work)], "unpack kernel source")
        src = next(p for p in work.iterdir() if p.is_dir())
        progress("kernel: configuring (tinyconfig + native/guest/kernel.config)")
        _run(["make", "-C", str(src), "tinyconfig"], "make tinyconfig")
        _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(src),
              str(src / ".config"), str(fragment_path)], "merge config fragment", cwd=src)
        _run(["make", "-C", str(src), "olddefconfig"], "make olddefconfig")
        dropped = _check_config((src / ".config").read_text(),
                                _fragment_options(fragment_path.read_text()))
        if dropped:
            raise AssetError("kernel config fragment options did not take effect: "
                             + ", ".join(dropped))
        progress(f"kernel: building bzImage + vmlinux with {jobs} jobs (several minutes)")
        _run(["make", "-C", str(src), f"-j{jobs}", "bzImage", "vmlinux"], "kernel build",
             env=REPRODUCIBLE_KBUILD_ENV)
        staging = Path(tempfile.mkdtemp(prefix="kernel-", dir=cache_dir()))
        shutil.copy2(src / "arch/x86/boot/bzImage", staging / "bzImage")
        # vmlinux keeps its ELF notes (the PVH entry point); drop symbols to save space.
        _run(["objcopy", "--strip-all", str(src / "vmlinux"), str(staging / "vmlinux")],
             "strip vmlinux")
        shutil.copy2(src / ".config", staging / "config")
        seconds = time.monotonic() - started
        (staging / "build-info.txt").write_text(
            f"source={_debian_package_version(KERNEL_SOURCE_PACKAGE)}\n"
            f"seconds={seconds:.0f}\njobs={jobs}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    progress(f"kernel: built in {seconds:.0f} s -> {out_dir}")
    return KernelBuild(out_dir, bzimage, vmlinux, built_now=True, seconds=seconds)


# Fixed build identity so that the same inputs give the same kernel (and `uname -v`).
REPRODUCIBLE_KBUILD_ENV = {"KBUILD_BUILD_TIMESTAMP": "2024-01-01 00:00:00 UTC",
                           "KBUILD_BUILD_USER": "supermachine", "KBUILD_BUILD_HOST": "builder"}


def _run(cmd: list[str], what: str, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise AssetError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


# ---------------------------------------------------------------------------------------------
# Initramfs
# ---------------------------------------------------------------------------------------------

AGENT_BUILD_PACKAGES = ["musl-tools", BUSYBOX_PACKAGE]
AGENT_CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=c11", "-s"]

# Busybox applets linked into /bin (everything else is reachable as `busybox NAME`).
BUSYBOX_LINKS = ("sh", "mount", "umount", "mkdir", "ls", "cat", "echo", "mknod", "sleep",
                 "poweroff", "reboot", "hostname", "mkfs.ext2", "sync", "uname", "free",
                 "ps", "kill", "dd", "sha256sum", "head", "tail", "grep", "sed", "awk",
                 "wc", "env", "true", "false", "rm", "cp", "mv", "touch", "date", "df",
                 "stat", "chmod", "ln", "seq", "tr", "sort", "uniq", "od", "printf", "id",
                 "hexdump", "md5sum", "find", "xargs", "test", "[", "tee", "yes", "du",
                 "basename", "dirname", "cut", "top", "vi", "less", "which", "dmesg",
                 "nproc", "timeout", "stty", "expr", "base64")


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    path: str               # relative, no leading slash
    mode: int               # full st_mode (type + permissions)
    data: bytes = b""       # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)   # (major, minor) of a device node


def pack_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A ``newc`` cpio archive, gzip-compressed, byte-for-byte reproducible.

    Entries are sorted by path; every header carries mtime 0, uid/gid 0 and an inode number
    derived from the sort order, and gzip gets mtime 0 and no file name (``gzip -n``).
    """
    raw = io.BytesIO()

    def header(ino: int, mode: int, nlink: int, size: int, name: bytes,
               rdev: tuple[int, int] = (0, 0)) -> bytes:
        fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        return b"070701" + b"".join(b"%08X" % f for f in fields)

    def pad(n: int) -> bytes:
        return b"\0" * ((4 - n % 4) % 4)

    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        name = entry.path.encode()
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        hdr = header(ino, entry.mode, nlink, len(entry.data), name, entry.rdev) + name + b"\0"
        raw.write(hdr + pad(len(hdr)))
        raw.write(entry.data + pad(len(entry.data)))
    trailer = header(0, 0, 1, 0, b"TRAILER!!!") + b"TRAILER!!!\0"
    raw.write(trailer + pad(len(trailer)))

    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def agent_sources() -> list[Path]:
    agent_dir = guest_source_dir() / "agent"
    return sorted(p for p in agent_dir.iterdir() if p.suffix in (".c", ".h"))


def initramfs_key() -> str:
    guest = guest_source_dir()
    inputs = [INITRAMFS_RECIPE_VERSION.encode(), (guest / "init").read_bytes()]
    for path in agent_sources():
        inputs += [path.name.encode(), path.read_bytes()]
    inputs.append((_debian_package_version(BUSYBOX_PACKAGE) or "").encode())
    inputs.append((_debian_package_version("musl-tools") or "").encode())
    inputs.append(" ".join(BUSYBOX_LINKS).encode())
    return _sha256(len(i).to_bytes(8, "little") + i for i in inputs)[:16]


def build_agent(output: Path) -> None:
    compiler = shutil.which("musl-gcc")
    if compiler is None:
        raise AssetError("musl-gcc not found: apt-get install musl-tools")
    sources = [str(p) for p in agent_sources() if p.suffix == ".c"]
    _run([compiler, *AGENT_CFLAGS, "-o", str(output), *sources], "agent build")


def initramfs_entries(agent_binary: bytes) -> list[CpioEntry]:
    guest = guest_source_dir()
    dirs = ["bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "usr",
            "usr/bin", "usr/sbin", "var", "var/tmp"]
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries[dirs.index("tmp")] = CpioEntry("tmp", stat.S_IFDIR | 0o1777)
    # /dev/console must exist before devtmpfs is mounted so PID 1 has a stdout.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX_PATH.read_bytes()))
    entries += [CpioEntry(f"bin/{name}", stat.S_IFLNK | 0o777, b"busybox")
                for name in BUSYBOX_LINKS]
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, (guest / "init").read_bytes()))
    entries.append(CpioEntry("sbin/supermachine-agent", stat.S_IFREG | 0o755, agent_binary))
    entries.append(CpioEntry("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(CpioEntry("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"))
    return entries


@dataclasses.dataclass(frozen=True)
class InitramfsBuild:
    path: Path
    built_now: bool


def ensure_initramfs(progress: Progress = _quiet) -> InitramfsBuild:
    """Return the cached initramfs, building agent + archive first when missing."""
    _apt_install(AGENT_BUILD_PACKAGES, progress)
    with _build_lock("initramfs", progress):
        return _ensure_initramfs_locked(progress)


def _ensure_initramfs_locked(progress: Progress) -> InitramfsBuild:
    path = cache_dir() / f"initramfs-{initramfs_key()}.cpio.gz"
    if path.is_file():
        return InitramfsBuild(path, built_now=False)
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=cache_dir()) as work:
        agent = Path(work) / "supermachine-agent"
        progress("initramfs: compiling the agent (musl-gcc -static)")
        build_agent(agent)
        progress("initramfs: packing busybox + init + agent")
        archive = pack_cpio(initramfs_entries(agent.read_bytes()))
        tmp = Path(work) / "initramfs.cpio.gz"
        tmp.write_bytes(archive)
        os.replace(tmp, path)
    progress(f"initramfs: {path} ({path.stat().st_size // 1024} KiB)")
    return InitramfsBuild(path, built_now=True)


@dataclasses.dataclass(frozen=True)
class GuestAssets:
    """Paths of a ready guest: what every engine boots."""
    kernel: Path       # bzImage
    vmlinux: Path      # PVH-capable ELF of the same build
    initrd: Path


def ensure_assets(progress: Progress = _quiet) -> GuestAssets:
    kernel = ensure_kernel(progress)
    initrd = ensure_initramfs(progress)
    return GuestAssets(kernel.bzimage, kernel.vmlinux, initrd.path)


def find_assets() -> GuestAssets | None:
    """The cached assets if both are built, without building anything."""
    try:
        kdir = cache_dir() / f"kernel-{kernel_key()}"
        initrd = cache_dir() / f"initramfs-{initramfs_key()}.cpio.gz"
    except (AssetError, OSError):
        return None
    if (kdir / "bzImage").is_file() and (kdir / "vmlinux").is_file() and initrd.is_file():
        return GuestAssets(kdir / "bzImage", kdir / "vmlinux", initrd)
    return None


def main_assets(argv: list[str] | None = None) -> int:
    """``python -m supermachine_jupyter assets``: build what is missing, print the paths."""
    def say(line: str) -> None:
        print(f"[assets] {line}", file=sys.stderr, flush=True)
    try:
        kernel = ensure_kernel(say)
        if kernel.built_now:
            say(f"kernel built in {kernel.seconds:.0f} s")
        initrd = ensure_initramfs(say)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel  {kernel.bzimage} ({kernel.bzimage.stat().st_size // 1024} KiB)")
    print(f"vmlinux {kernel.vmlinux} ({kernel.vmlinux.stat().st_size // 1024} KiB)")
    print(f"initrd  {initrd.path} ({initrd.path.stat().st_size // 1024} KiB)")
    return 0
