"""Guest assets: the kernel and the initramfs every VM boots, whatever the engine.

Where they come from, first match wins (:func:`find_assets`):

1. a build from source in the user cache dir (``$XDG_CACHE_HOME`` or ``~/.cache``, then
   ``supermachine-jupyter/``) made from the guest sources this package has: a clone's
   ``native/guest``, or the wheel's copy ``supermachine_jupyter/guest_src`` (``python -m
   supermachine_jupyter assets --build``, for people who change the kernel config);
2. the packaged guest: a wheel carries the kernel and initramfs built at wheel-build time by
   this same recipe (:func:`package_guest`) in ``supermachine_jupyter/_guest/``, used as is;
3. otherwise (a clone) they are built into the cache on first use.

The cache is only written to when something is built: a read-only cache that holds what it
needs (a shared, pre-filled one) is used as is.

Both are built on this machine from Debian packages, keyed by a hash of their inputs, so a
second build is a no-op:

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
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


PACKAGE_DIR = Path(__file__).resolve().parents[1]     # supermachine_jupyter/
#: Where a wheel carries the prebuilt guest (written by :func:`package_guest` at build time).
PACKAGED_GUEST_DIR = PACKAGE_DIR / "_guest"
PACKAGED_GUEST_MANIFEST = "manifest.json"
#: Where a wheel carries the guest sources (kernel fragment, init, agent) for ``--build``.
PACKAGED_SOURCES_DIR = PACKAGE_DIR / "guest_src"
#: What of ``native/guest`` the recipe reads (and the wheel copies into ``guest_src``).
GUEST_SOURCE_PATTERNS = ("kernel.config", "init", "agent/*.c", "agent/*.h")


def guest_source_dir() -> Path:
    """Where ``native/guest`` (kernel fragment, init, agent source) lives: a clone's, else
    the wheel's copy."""
    for candidate in (PACKAGE_DIR.parent / "native" / "guest", PACKAGED_SOURCES_DIR):
        if (candidate / "kernel.config").is_file():
            return candidate
    raise AssetError(
        f"guest sources not found next to {PACKAGE_DIR}: install the package from a wheel "
        "or a source checkout (pip install -e .)"
    )


def cache_dir() -> Path:
    """The user cache dir of this package (created when it can be; a read-only one is fine
    as long as nothing needs building)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "supermachine-jupyter"
    with contextlib.suppress(OSError):
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
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
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
    """One builder per cache entry across processes (parallel tests, two notebooks). Taken
    only to build: a cache that cannot be written to says so here."""
    try:
        lock = open(cache_dir() / f"{name}.lock", "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise AssetError(
            f"the guest {name} is not in the cache {cache_dir()} and cannot be built there "
            f"({exc.strerror}): point XDG_CACHE_HOME at a writable directory, or fill the "
            "cache with `python -m supermachine_jupyter assets --build` as a user who can "
            "write it") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"{name}: waiting for another process that is building it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached_kernel() -> KernelBuild | None:
    out_dir = cache_dir() / f"kernel-{kernel_key()}"
    bzimage, vmlinux = out_dir / "bzImage", out_dir / "vmlinux"
    if bzimage.is_file() and vmlinux.is_file():
        return KernelBuild(out_dir, bzimage, vmlinux, built_now=False, seconds=0.0)
    return None


def ensure_kernel(progress: Progress = _quiet, jobs: int | None = None) -> KernelBuild:
    """Return the cached kernel, building it first when the cache lacks it."""
    cached = _cached_kernel()          # no lock to read: the cache may be read-only
    if cached is not None:
        return cached
    with _build_lock("kernel", progress):
        # Work trees of builds that were killed midway (we hold the lock: none is running).
        for stale in cache_dir().glob("kernel-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return _ensure_kernel_locked(progress, jobs)


def _ensure_kernel_locked(progress: Progress, jobs: int | None) -> KernelBuild:
    cached = _cached_kernel()          # built by another process while we waited
    if cached is not None:
        return cached
    _apt_install(KERNEL_BUILD_PACKAGES, progress)
    # The source package version is part of the key: look again after installing it.
    cached = _cached_kernel()
    if cached is not None:
        return cached
    out_dir = cache_dir() / f"kernel-{kernel_key()}"
    bzimage, vmlinux = out_dir / "bzImage", out_dir / "vmlinux"

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
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
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


def _cached_initramfs() -> InitramfsBuild | None:
    path = cache_dir() / f"initramfs-{initramfs_key()}.cpio.gz"
    return InitramfsBuild(path, built_now=False) if path.is_file() else None


def ensure_initramfs(progress: Progress = _quiet) -> InitramfsBuild:
    """Return the cached initramfs, building agent + archive first when missing."""
    cached = _cached_initramfs()       # no lock to read: the cache may be read-only
    if cached is not None:
        return cached
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
    kernel: Path       # bzImage (QEMU microvm)
    vmlinux: Path      # PVH-capable ELF of the same build (the native core enters it directly)
    initrd: Path
    origin: str = "cache"   # "cache" (built from source here) or "packaged" (the wheel's)


def ensure_assets(progress: Progress = _quiet) -> GuestAssets:
    """The guest to boot (:func:`find_assets`), building it into the cache when there is
    none."""
    found = find_assets()
    if found is not None:
        return found
    return build_assets(progress)


def build_assets(progress: Progress = _quiet) -> GuestAssets:
    """Build kernel and initramfs from the guest sources into the cache (each only when the
    cache lacks it)."""
    kernel = ensure_kernel(progress)
    initrd = ensure_initramfs(progress)
    return GuestAssets(kernel.bzimage, kernel.vmlinux, initrd.path)


def find_assets() -> GuestAssets | None:
    """The guest to boot without building anything: the cache's build of this package's
    guest sources, else the packaged guest, else None."""
    try:
        kernel, initrd = _cached_kernel(), _cached_initramfs()
    except (AssetError, OSError):
        kernel = initrd = None
    if kernel is not None and initrd is not None:
        return GuestAssets(kernel.bzimage, kernel.vmlinux, initrd.path)
    return packaged_assets()


# ---------------------------------------------------------------------------------------------
# The packaged guest (what a wheel carries)
# ---------------------------------------------------------------------------------------------

#: The files of a packaged guest: name in ``_guest/`` → where the recipe leaves it.
PACKAGED_FILES = ("bzImage", "vmlinux", "initramfs.cpio.gz")


def packaged_assets(directory: Path = PACKAGED_GUEST_DIR) -> GuestAssets | None:
    """The guest a wheel carries, when this install has one (a clone has none)."""
    try:
        manifest = json.loads((directory / PACKAGED_GUEST_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = {name: directory / name for name in PACKAGED_FILES}
    sizes = manifest.get("files", {})
    for name, path in files.items():
        # A truncated or swapped file would boot into an obscure failure: say it here.
        if not path.is_file() or path.stat().st_size != sizes.get(name, {}).get("size"):
            raise AssetError(f"the packaged guest in {directory} is damaged ({name} is missing "
                             "or has the wrong size): reinstall the package")
    return GuestAssets(files["bzImage"], files["vmlinux"], files["initramfs.cpio.gz"],
                       origin="packaged")


def package_guest(destination: Path, progress: Progress = _quiet) -> dict:
    """Build the guest by this recipe (reusing the cache) and copy it into ``destination``
    with a manifest: what a wheel carries. Byte-reproducible: the same inputs give the same
    files and the same manifest (no times, no paths of this machine)."""
    kernel = ensure_kernel(progress)
    initrd = ensure_initramfs(progress)
    destination.mkdir(parents=True, exist_ok=True)
    sources = {"bzImage": kernel.bzimage, "vmlinux": kernel.vmlinux,
               "initramfs.cpio.gz": initrd.path}
    files = {}
    for name, source in sources.items():
        target = destination / name
        shutil.copyfile(source, target)
        target.chmod(0o644)
        data = target.read_bytes()
        files[name] = {"size": len(data), "sha256": _sha256([data])}
    manifest = {
        "kernel_key": kernel_key(), "initramfs_key": initramfs_key(),
        "kernel_source": _debian_package_version(KERNEL_SOURCE_PACKAGE),
        "busybox": _debian_package_version(BUSYBOX_PACKAGE),
        "musl": _debian_package_version("musl-tools"),
        "files": files,
    }
    (destination / PACKAGED_GUEST_MANIFEST).write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def copy_guest_sources(destination: Path) -> list[Path]:
    """Copy what the recipe reads of ``native/guest`` into ``destination`` (the wheel's
    ``guest_src``), so that ``assets --build`` works from a wheel too."""
    source = guest_source_dir()
    copied = []
    for pattern in GUEST_SOURCE_PATTERNS:
        for path in sorted(source.glob(pattern)):
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            target.chmod(0o755 if path.name == "init" else 0o644)
            copied.append(target)
    return copied


def main_assets(argv: list[str] | None = None) -> int:
    """``python -m supermachine_jupyter assets [--build]``: print the guest that VMs boot
    (building it only when there is none); ``--build`` builds from source into the cache
    (a no-op when the cache has this build), which VMs then prefer."""
    build = "--build" in (argv or [])

    def say(line: str) -> None:
        print(f"[assets] {line}", file=sys.stderr, flush=True)
    try:
        found = build_assets(say) if build else ensure_assets(say)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    say(f"using the {'packaged guest' if found.origin == 'packaged' else 'build in the cache'}")
    print(f"kernel  {found.kernel} ({found.kernel.stat().st_size // 1024} KiB)")
    print(f"vmlinux {found.vmlinux} ({found.vmlinux.stat().st_size // 1024} KiB)")
    print(f"initrd  {found.initrd} ({found.initrd.stat().st_size // 1024} KiB)")
    return 0
