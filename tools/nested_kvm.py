"""The nested-KVM L1: a Linux under QEMU TCG whose /dev/kvm runs Linux guests.

This workplace's /dev/kvm cannot boot Linux (see DESIGN.md, "This workplace's machines"), but
QEMU's TCG emulates AMD SVM with nested paging (``-cpu max``): a Linux booted that way ("L1")
loads ``kvm_amd`` and has a /dev/kvm with real semantics. This module builds that L1 and runs a
command in it, inside a chroot of the host's own root, so the project's venv runs there
unchanged:

* **build** (:func:`ensure_l1`): Debian's stock kernel from ``linux-image-amd64`` (fetched
  with ``apt-get download``, nothing but Debian's archive), the modules ``kvm_amd`` and the 9p
  file system over virtio-pci with every dependency their ``.modinfo`` names (the package
  ships no ``modules.dep``: depmod builds that from the same field), and a busybox
  (``busybox-static``) initramfs whose ``/init`` is :data:`INIT_SCRIPT`. Cached in
  ``$XDG_CACHE_HOME/supermachine-jupyter/nested/l1-<kernel package version>-<recipe hash>/``.
* **run** (:func:`run_l1`): ``qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 1
  -m 4096 -M q35`` (``-smp 2`` for the few tests that need two CPUs: see ``L1_VCPUS``); the
  host's ``/`` shared read-only over virtio-9p, a results folder shared read-write; the init loads the modules, mounts both, sets up /proc /sys /dev /tmp /run in
  the host root, chroots into it and runs ``run.sh`` (written by the caller into the results
  folder), writes the exit status there and powers off. The serial console goes to
  ``console.log`` in the results folder, each line stamped with host seconds since the start.
* **L1's own failures** are told apart from the command's: a panic or oops of L1 (its kernel
  panics on an oops, a soft lockup or an RCU stall) ends QEMU and :attr:`L1Run.crash` quotes
  the console; an L1 that wedges without a word (seen while kvm_amd ran a guest) stops the
  init's heartbeat file, and after :data:`HEARTBEAT_LOST_S` it is killed, its vCPUs' RIPs read
  on QEMU's monitor and named from L1's own kallsyms (saved by its first boot; nokaslr).

Besides the guest image's reproducible cpio writer (``supermachine_jupyter.guest.assets``) and,
for ``run``, the guest assets built on the host (:func:`guest_assets_prelude`) it needs only
Python, QEMU, ``apt-get``/``dpkg-deb`` and ``/bin/busybox``.

Command line::

    python tools/nested_kvm.py build                 # build (or find) the L1, print timings
    python tools/nested_kvm.py run -- uname -a        # boot L1, run a command in the host root
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from supermachine_jupyter.guest.assets import CpioEntry, pack_cpio

#: Bump when the recipe changes in a way the hashed inputs (init script, module list, busybox
#: version) do not show.
RECIPE_VERSION = "3"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"
QEMU = "qemu-system-x86_64"

#: The modules L1 needs (their dependencies are added from each module's ``depends=``):
#: KVM for AMD SVM, and the 9p file system over virtio-pci for the two shares.
WANTED_MODULES = ("irqbypass", "ccp", "kvm", "kvm_amd",
                  "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                  "virtio_pci", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p")

L1_MEMORY_MIB = 4096
#: L1's CPUs. One, unless a run asks for more. With two, L1 itself crashed (our vCPU thread
#: overflowing L1's kernel stack in an exception storm) or hung in 5 of 8 boots of the tier;
#: with one it never crashed in 12 runs of the tier, but it hangs now and then (its only CPU
#: idle in HLT, or running the L2 guest in a loop that waits for a timer tick, and no timer
#: interrupt reaching L1 again; neither QEMU's stop + cont nor an NMI revives it): the tier
#: boots L1 again for the tests a hang cut short. SUPERMACHINE_L1_VCPUS overrides it.
L1_VCPUS = int(os.environ.get("SUPERMACHINE_L1_VCPUS", "1"))
#: panic=-1 + QEMU's -no-reboot: a panic ends QEMU at once; oops=panic, softlockup_panic and
#: panic_on_rcu_stall: an oops or a stuck CPU in L1 (e.g. kvm_amd under the emulated SVM) is a
#: crash we see and retry, not a hang; nokaslr: L1's addresses read against System.map.
L1_CMDLINE = ("console=ttyS0 panic=-1 oops=panic softlockup_panic=1 "
              "sysctl.kernel.panic_on_rcu_stall=1 nokaslr loglevel=4")
#: L1 writes results/heartbeat every HEARTBEAT_S; none for HEARTBEAT_LOST_S means L1 is wedged
#: (seen: both vCPUs busy, no console line, no panic, while kvm_amd ran our guest).
HEARTBEAT_S = 5
HEARTBEAT_LOST_S = 90
#: From QEMU's start to the init's first heartbeat (L1 boots in ~8 s here).
BOOT_DEADLINE_S = 180
#: Where the results share appears inside the chroot (the host root's /tmp is a tmpfs there).
RESULTS_IN_L1 = "/tmp/nested-results"
#: Lines of L1's console that mean L1 itself crashed (not a test, not the L2 guest).
L1_CRASH_PATTERNS = ("Kernel panic - not syncing", "BUG: ", "Oops: ", "general protection fault",
                     "kernel BUG at", "stack guard page", "Unable to handle kernel",
                     "Call Trace:", "watchdog: BUG: soft lockup")

Progress = Callable[[str], None]

#: PID 1 of L1 (busybox ash). Reports on the console with an "l1-init:" prefix.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "l1-init: $*"; }
fail() { say "FAILED: $*"; echo 125 > /results/status 2>/dev/null; sync; poweroff -f; }
say "kernel $(uname -r) up at $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /modules.list); do
    insmod "/modules/$m.ko" || say "insmod $m failed"
done
mkdir -p /host /results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host /host \
    || fail "cannot mount the host root (9p tag 'host')"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results \
    || fail "cannot mount the results share (9p tag 'results')"
# Host directories the command needs under /tmp or /run (a clone of the project may live
# there): bound aside before L1's tmpfs hides them, then put back at the same path.
n=0
while read -r keep; do
    [ -n "$keep" ] || continue
    mkdir -p "/keep/$n" && mount --bind "/host$keep" "/keep/$n" || fail "cannot keep $keep"
    n=$((n + 1))
done < /results/keep-paths
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "tmpfs on /tmp"
mount -t tmpfs -o mode=755 tmpfs /host/run || fail "tmpfs on /run"
n=0
while read -r keep; do
    [ -n "$keep" ] || continue
    mkdir -p "/host$keep" && mount --bind "/keep/$n" "/host$keep" || fail "cannot restore $keep"
    n=$((n + 1))
done < /results/keep-paths
mount -t proc proc /host/proc || fail "proc"
mount -t sysfs sysfs /host/sys || fail "sysfs"
mount -t devtmpfs devtmpfs /host/dev || fail "devtmpfs"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mkdir -p /host/tmp/nested-results
mount --bind /results /host/tmp/nested-results || fail "bind the results share"
{
    echo "kernel=$(uname -r)"
    echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
    echo "svm=$(grep -m1 -ow svm /proc/cpuinfo)"
    echo "npt=$(grep -m1 -ow npt /proc/cpuinfo)"
    echo "kvm_device=$(test -c /dev/kvm && echo yes || echo no)"
    echo "modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
    echo "memory_kib=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
    echo "command_start_uptime=$(cut -d' ' -f1 /proc/uptime)"
} > /results/l1-info.txt
# Debian ships System.map as a stub: the host asks once for L1's own symbol table (nokaslr:
# the addresses hold for every boot of this kernel) to name where a wedged vCPU is.
[ -e /results/want-kallsyms ] && cat /proc/kallsyms > /results/kallsyms
say "svm=$(grep -m1 -ow svm /proc/cpuinfo) npt=$(grep -m1 -ow npt /proc/cpuinfo) /dev/kvm=$(test -c /dev/kvm && echo yes || echo no)"
( while :; do date +%s > /results/heartbeat.tmp && mv /results/heartbeat.tmp /results/heartbeat
    sleep HEARTBEAT_S; done ) &
heartbeat=$!
say "command starts at $(cut -d' ' -f1 /proc/uptime) s"
( chroot /host /bin/sh /tmp/nested-results/run.sh < /dev/null; echo $? > /results/status.tmp ) 2>&1 \
    | tee /results/output.log
mv /results/status.tmp /results/status
say "command ended with status $(cat /results/status) at $(cut -d' ' -f1 /proc/uptime) s"
kill $heartbeat 2>/dev/null
sync
umount /host/tmp/nested-results 2>/dev/null
umount /results 2>/dev/null
poweroff -f
""".replace("HEARTBEAT_S", str(HEARTBEAT_S))


def _quiet(_: str) -> None:
    pass


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/supermachine-jupyter/nested`` (``~/.cache`` without XDG)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "supermachine-jupyter" / "nested"


class L1Error(RuntimeError):
    """The L1 could not be built or booted here; the message says why."""


# ---------------------------------------------------------------------------------------------
# The kernel package
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise L1Error(f"{what}: {cmd[0]} is not installed ({exc})") from exc
    if proc.returncode != 0:
        raise L1Error(f"{what}: `{shlex.join(cmd)}` failed with status {proc.returncode}:\n"
                      f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc


def _apt_show(package: str) -> str | None:
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def _field(record: str, name: str) -> str | None:
    match = re.search(rf"^{name}: *(.*)$", record, re.MULTILINE)
    return match.group(1).strip() if match else None


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    meta_version: str       # version of linux-image-amd64 (the cache key)
    package: str            # the image package it depends on, e.g. linux-image-6.1.0-57-amd64
    version: str


def resolve_kernel_package(progress: Progress = _quiet) -> KernelPackage:
    """The candidate ``linux-image-amd64`` and the image package it pulls in (apt's lists;
    ``apt-get update`` first when they lack it)."""
    if shutil.which("apt-cache") is None:
        raise L1Error("apt-cache is missing: the L1 kernel comes from Debian's archive "
                      "(a Debian or Ubuntu host with apt is needed)")
    record = _apt_show(KERNEL_META_PACKAGE)
    if record is None:
        if os.geteuid() != 0:
            raise L1Error(f"apt knows no {KERNEL_META_PACKAGE}: run `sudo apt-get update`")
        progress("apt-get update (the package lists lack linux-image-amd64)")
        _run(["apt-get", "update", "-q"], "apt-get update")
        record = _apt_show(KERNEL_META_PACKAGE)
        if record is None:
            raise L1Error(f"apt knows no {KERNEL_META_PACKAGE} even after apt-get update")
    meta_version = _field(record, "Version")
    depends = _field(record, "Depends") or ""
    match = re.search(r"(linux-image-[0-9][^ ,(]*)\s*\(=\s*([^)]+)\)", depends)
    if not meta_version or not match:
        raise L1Error(f"cannot read the image package from {KERNEL_META_PACKAGE}'s record:\n"
                      f"Version: {meta_version}\nDepends: {depends}")
    return KernelPackage(meta_version, match.group(1), match.group(2).strip())


# ---------------------------------------------------------------------------------------------
# Modules: their .modinfo "depends=" is what depmod turns into modules.dep
# ---------------------------------------------------------------------------------------------

def modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module (an ELF64 relocatable): key → values."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise L1Error(f"{path} is not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names_at = sections[shstrndx][4]
    info: dict[str, list[str]] = {}
    for name_off, _type, _flags, _addr, offset, size, *_ in sections:
        name = data[names_at + name_off:data.index(b"\0", names_at + name_off)]
        if name == b".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    key, value = item.decode(errors="replace").split("=", 1)
                    info.setdefault(key, []).append(value)
    return info


def module_closure(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``wanted`` with every module they depend on, in load order (dependencies first)."""
    index = {p.name[:-3].replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in chain:
            raise L1Error(f"module dependency loop: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise L1Error(f"module {name} (needed by {' -> '.join(chain) or 'L1'}) is not in "
                          f"{modules_dir}")
        deps = [d for d in ",".join(modinfo(index[name]).get("depends", [""])).split(",") if d]
        for dep in deps:
            visit(dep, chain + (name,))
        seen.add(name)
        order.append((name, index[name]))

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------------------------------------
# The initramfs
# ---------------------------------------------------------------------------------------------

def initramfs_entries(modules: list[tuple[str, Path]]) -> list[CpioEntry]:
    """L1's initramfs (packed by the guest image's own reproducible cpio writer)."""
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [(name, d, b"", (0, 0)) for name in
               ("bin", "dev", "proc", "sys", "tmp", "host", "results", "modules")]
    entries += [("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
                ("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)),
                ("bin/busybox", x, BUSYBOX.read_bytes(), (0, 0)),
                ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)),
                ("init", x, INIT_SCRIPT.encode(), (0, 0)),
                ("modules.list", f, "".join(f"{n}\n" for n, _ in modules).encode(), (0, 0))]
    entries += [(f"modules/{name}.ko", f, path.read_bytes(), (0, 0)) for name, path in modules]
    return [CpioEntry(path, mode, data, rdev) for path, mode, data, rdev in entries]


# ---------------------------------------------------------------------------------------------
# Build (cached)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class L1Assets:
    directory: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    package: str
    version: str
    modules: tuple[str, ...]
    built_now: bool
    seconds: float          # the build's time (when built now), else the look-up's


def _debian_version(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def recipe_key() -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, INIT_SCRIPT, ",".join(WANTED_MODULES), L1_CMDLINE,
                 _debian_version(BUSYBOX_PACKAGE)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def _newest_cached() -> Path | None:
    found = sorted(cache_root().glob("l1-*/info.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def _load(directory: Path, built_now: bool, seconds: float) -> L1Assets:
    info = json.loads((directory / "info.json").read_text())
    return L1Assets(directory, directory / "vmlinuz", directory / "initrd.gz",
                    info["kernel_release"], info["package"], info["version"],
                    tuple(info["modules"]), built_now, seconds)


def ensure_l1(progress: Progress = _quiet) -> L1Assets:
    """The cached L1 kernel + initramfs, built first when the cache lacks them."""
    started = time.monotonic()
    if not BUSYBOX.is_file():
        raise L1Error(f"{BUSYBOX} is missing: apt-get install {BUSYBOX_PACKAGE}")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pkg = resolve_kernel_package(progress)
        except L1Error:
            cached = _newest_cached()        # no apt lists and no network: use what we have
            if cached is None:
                raise
            progress(f"apt cannot name {KERNEL_META_PACKAGE} now; using the cached {cached.name}")
            return _load(cached, False, time.monotonic() - started)
        directory = root / f"l1-{pkg.meta_version}-{recipe_key()}"
        if (directory / "info.json").is_file():
            return _load(directory, False, time.monotonic() - started)
        for stale in root.glob("build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work:
            _build(Path(work), pkg, directory, progress)
        for old in root.glob("l1-*"):       # other kernel versions or recipes
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        seconds = time.monotonic() - started
        info = json.loads((directory / "info.json").read_text())
        info["build_seconds"] = round(seconds, 1)
        (directory / "info.json").write_text(json.dumps(info, indent=1))
        return _load(directory, True, seconds)


def _build(work: Path, pkg: KernelPackage, directory: Path, progress: Progress) -> None:
    os.chmod(work, 0o755)    # apt-get download hands the file to its _apt user
    progress(f"apt-get download {pkg.package}={pkg.version}")
    _run(["apt-get", "download", "-q", f"{pkg.package}={pkg.version}"], "apt-get download",
         cwd=work)
    debs = list(work.glob(f"{pkg.package}_*.deb"))
    if len(debs) != 1:
        raise L1Error(f"apt-get download left {debs} in {work}")
    progress(f"unpacking {debs[0].name}")
    tree = work / "tree"
    _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], "dpkg-deb -x")
    kernels = list((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise L1Error(f"{debs[0].name} holds {len(kernels)} kernels in /boot")
    release = kernels[0].name[len("vmlinuz-"):]
    modules = module_closure(tree / "lib" / "modules" / release, WANTED_MODULES)
    progress(f"initramfs: busybox + {len(modules)} modules ({', '.join(n for n, _ in modules)})")
    staging = Path(tempfile.mkdtemp(prefix="l1-", dir=work))
    shutil.copyfile(kernels[0], staging / "vmlinuz")
    (staging / "initrd.gz").write_bytes(pack_cpio(initramfs_entries(modules)))
    (staging / "init").write_text(INIT_SCRIPT)
    (staging / "info.json").write_text(json.dumps({
        "kernel_release": release, "package": pkg.package, "version": pkg.version,
        "meta_package": KERNEL_META_PACKAGE, "meta_version": pkg.meta_version,
        "modules": [n for n, _ in modules], "recipe": recipe_key()}, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class L1Run:
    """What one boot of L1 did. ``status`` is the command's exit status, None when L1 did not
    get to write it (``crash`` then says what L1's console shows)."""
    results: Path
    status: int | None
    wall_seconds: float
    boot_seconds: float | None      # QEMU start → the command starts (host wall clock)
    command_seconds: float | None   # the command's own run (host wall clock)
    info: dict
    crash: str | None = None
    timed_out: bool = False
    qemu_status: int | None = None

    @property
    def console_log(self) -> Path:
        return self.results / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    @property
    def kvm_ready(self) -> bool:
        return (self.info.get("kvm_device") == "yes" and self.info.get("svm") == "svm"
                and self.info.get("npt") == "npt")


def qemu_argv(assets: L1Assets, results: Path, cmdline: str = L1_CMDLINE,
              vcpus: int = L1_VCPUS) -> list[str]:
    def escape(path: Path) -> str:  # QEMU option values: a comma is written twice
        return str(path).replace(",", ",,")
    return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(vcpus),
            "-m", str(L1_MEMORY_MIB), "-M", "q35", "-nodefaults", "-no-reboot",
            "-display", "none", "-serial", "stdio",
            "-monitor", f"unix:{escape(results / 'monitor.sock')},server=on,wait=off",
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", cmdline,
            "-fsdev", "local,id=h,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=h,mount_tag=host",
            "-fsdev", f"local,id=r,path={escape(results)},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=r,mount_tag=results"]


def write_run_script(results: Path, argv: list[str], *, cwd: str, env: dict[str, str],
                     prelude: str = "") -> None:
    """``run.sh``: what the init runs in the chroot (the host root, /tmp a tmpfs)."""
    lines = ["#!/bin/sh", "# written by tools/nested_kvm.py: runs inside L1, chrooted into "
             "the host's root (read-only; /tmp, /run, /dev/shm are L1's tmpfs)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if prelude:
        lines.append(prelude)
    lines += [f"cd {shlex.quote(cwd)} || exit 125", f"exec {shlex.join(argv)}"]
    (results / "run.sh").write_text("\n".join(lines) + "\n")
    # The working directory survives L1's tmpfs on /tmp and /run (the init binds it back).
    hidden = [cwd] if cwd.startswith(("/tmp/", "/run/")) and "\n" not in cwd else []
    (results / "keep-paths").write_text("".join(f"{path}\n" for path in hidden))


def default_env() -> dict[str, str]:
    """The environment of the command in L1: the host user's, with writable caches and /tmp."""
    keep = ("LANG", "LC_ALL", "TERM")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HOME=os.path.expanduser("~"),
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               TMPDIR="/tmp", XDG_CACHE_HOME="/tmp/l1-cache", PYTHONDONTWRITEBYTECODE="1",
               # Jupyter's and IPython's folders: the host's are read-only in L1.
               JUPYTER_RUNTIME_DIR="/tmp/l1-jupyter-runtime", IPYTHONDIR="/tmp/l1-ipython",
               JUPYTER_DATA_DIR="/tmp/l1-jupyter-data",
               SUPERMACHINE_NESTED_L1="1", SUPERMACHINE_NESTED_RESULTS=RESULTS_IN_L1)
    return env


def guest_assets_prelude(env: dict[str, str], progress: Progress = _quiet) -> str:
    """Shell lines for ``run.sh`` that make the host's guest kernel and initramfs the ones the
    command finds in L1 (``$XDG_CACHE_HOME/supermachine-jupyter``, a tmpfs there): L1 sees the
    host root read-only and, at TCG speed, must never build a kernel itself. Builds the guest
    on the host first if it is missing."""
    from supermachine_jupyter import Image
    image = Image.default(progress)
    cache = f"{env['XDG_CACHE_HOME']}/supermachine-jupyter"
    return "\n".join([f"mkdir -p {shlex.quote(cache)}",
                      f"ln -s {shlex.quote(str(Path(image.kernel).parent))} {shlex.quote(cache)}/",
                      f"ln -s {shlex.quote(str(image.initrd))} {shlex.quote(cache)}/"])


def crash_lines(console: str) -> list[str]:
    """L1's own crash lines (panic, BUG, oops) in its console (host time stamps removed)."""
    lines = [re.sub(r"^\[ *[0-9.]+\] ", "", line) for line in console.splitlines()]
    return [line for line in lines
            if any(p in line for p in L1_CRASH_PATTERNS) and "l1-init:" not in line]


def run_l1(assets: L1Assets, results: Path, *, timeout: float = 1800.0,
           echo: Callable[[str], None] | None = None, vcpus: int = L1_VCPUS) -> L1Run:
    """Boot L1 once with ``vcpus`` CPUs; the init runs ``results/run.sh`` (see
    :func:`write_run_script`)."""
    if shutil.which(QEMU) is None:
        raise L1Error(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if not (results / "run.sh").is_file():
        raise L1Error(f"{results}/run.sh is missing: write it with write_run_script")
    for stale in ("status", "status.tmp", "l1-info.txt", "output.log", "heartbeat",
                  "l1-cpus.txt", "l1-registers.txt"):
        (results / stale).unlink(missing_ok=True)
    kallsyms = assets.directory / "kallsyms"
    if not kallsyms.is_file():
        (results / "want-kallsyms").touch()
    argv = qemu_argv(assets, results, vcpus=vcpus)
    (results / "qemu-argv.json").write_text(json.dumps(argv))
    started = time.monotonic()
    marks: dict[str, float] = {}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def pump() -> None:
        with open(results / "console.log", "w", errors="replace") as log:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                now = time.monotonic() - started
                if "l1-init: command starts" in line:
                    marks.setdefault("command", now)
                if "l1-init: command ended" in line:
                    marks.setdefault("ended", now)
                log.write(f"[{now:8.2f}] {line}\n")
                log.flush()
                if echo:
                    echo(line)

    reader = threading.Thread(target=pump, name="l1-console", daemon=True)
    reader.start()
    timed_out = False
    wedged: str | None = None
    try:
        wedged = _watch(proc, results, started, timeout)
        timed_out = wedged is None and proc.poll() is None
        if wedged or timed_out:
            _snapshot_cpus(results, assets)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        reader.join(timeout=10)
    wall = time.monotonic() - started
    if (results / "kallsyms").is_file() and not kallsyms.is_file():
        shutil.copyfile(results / "kallsyms", kallsyms.with_suffix(".tmp"))
        os.replace(kallsyms.with_suffix(".tmp"), kallsyms)
    status = None
    try:
        status = int((results / "status").read_text().strip())
    except (OSError, ValueError):
        pass
    info = _read_info(results / "l1-info.txt")
    run = L1Run(results, status, wall, marks.get("command"),
                (marks["ended"] - marks["command"]) if {"command", "ended"} <= marks.keys()
                else None, info, timed_out=timed_out, qemu_status=proc.returncode)
    if status is None:
        console = (results / "console.log").read_text(errors="replace") \
            if (results / "console.log").exists() else ""
        found = crash_lines(console)
        cpus = _read_text(results / "l1-cpus.txt")
        where = f" (L1's vCPUs then: {cpus})" if cpus else ""
        if wedged:
            run.crash = f"L1 hung: {wedged}; killed{where}"
        elif timed_out:
            run.crash = f"L1 did not finish within {timeout:.0f} s (killed){where}"
        elif found:
            telling = [line for line in found if "Call Trace:" not in line] or found
            run.crash = "L1 crashed: " + " | ".join(telling[:4])
        else:
            run.crash = (f"L1 ended (QEMU status {proc.returncode}) without writing the "
                         "command's exit status")
    return run


def _watch(proc: subprocess.Popen, results: Path, started: float, timeout: float) -> str | None:
    """Wait for QEMU to end; None when it did (or ``timeout`` passed), else why L1 is wedged:
    no heartbeat from its init for HEARTBEAT_LOST_S (or none at all within BOOT_DEADLINE_S)."""
    beat = results / "heartbeat"
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            return None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - started > timeout:
            return None
        if (results / "status").exists():
            continue            # the command ended; L1 is powering off
        try:
            silent = time.time() - beat.stat().st_mtime
        except FileNotFoundError:
            if now - started > BOOT_DEADLINE_S:
                return f"its init gave no heartbeat within {BOOT_DEADLINE_S} s of QEMU's start"
            continue
        if silent > HEARTBEAT_LOST_S:
            return f"no heartbeat from its init for {silent:.0f} s"


def _monitor(results: Path, command: str, wait_s: float = 3.0) -> str:
    """One HMP command on L1's QEMU monitor; its output ('' when unreachable)."""
    import socket
    out = b""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(wait_s)
            sock.connect(str(results / "monitor.sock"))
            sock.sendall(command.encode() + b"\n")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                out += chunk
    except OSError as exc:
        return f"(monitor unreachable: {exc})"
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))


def _snapshot_cpus(results: Path, assets: "L1Assets") -> None:
    """Where a wedged L1's vCPUs are: ``info registers -a`` into l1-registers.txt and each
    RIP, named from L1's System.map (L1 boots with nokaslr), into l1-cpus.txt."""
    text = _monitor(results, "info registers -a")
    (results / "l1-registers.txt").write_text(text)
    rips = re.findall(r"RIP=([0-9a-f]{16})", text)
    kallsyms = results / "kallsyms"                 # this boot's, else the cached one
    if not kallsyms.is_file():
        kallsyms = assets.directory / "kallsyms"
    names = [f"CPU#{i} RIP {rip} {symbolize(kallsyms, int(rip, 16))}"
             for i, rip in enumerate(rips)]
    (results / "l1-cpus.txt").write_text("; ".join(names))


def symbolize(kallsyms: Path, address: int) -> str:
    """``function+0xoffset [module]`` of an L1 kernel address, from L1's /proc/kallsyms
    saved by its first boot ('' when unknown)."""
    try:
        lines = kallsyms.read_text().splitlines()
    except OSError:
        return ""
    best = None
    for line in lines:
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in ("t", "T", "w", "W"):
            start = int(parts[0], 16)
            if start <= address and (best is None or start > best[0]):
                best = (start, parts[2])
    # Past the end of the nearest function by this much, it is no L1 code: a CPU stopped
    # while running the L2 guest shows the guest's RIP (seen: our kernel's APIC calibration).
    if best is None or address - best[0] > 1 << 16:
        return "(not in L1's kernel: the CPU may be running the L2 guest)"
    name, _, module = best[1].partition(" ")
    return f"{name}+{address - best[0]:#x}" + (f" {module}" if module else "")


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _read_info(path: Path) -> dict:
    info = {}
    try:
        for line in path.read_text().splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                info[key] = value.strip()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build (or find) the cached L1 and say where it is")
    run = sub.add_parser("run", help="boot L1 and run a command in the host root (chroot)")
    run.add_argument("--cwd", default=os.getcwd())
    run.add_argument("--results", help="results folder (default: a new temporary one)")
    run.add_argument("--timeout", type=float, default=1800.0)
    run.add_argument("--quiet", action="store_true", help="do not echo L1's console")
    run.add_argument("--cpus", type=int, default=L1_VCPUS,
                     help=f"L1's CPUs (default {L1_VCPUS}: see L1_VCPUS)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(f"[nested] {line}", file=sys.stderr, flush=True)

    try:
        assets = ensure_l1(say)
    except L1Error as exc:
        say(f"cannot build L1: {exc}")
        return 2
    say(f"L1 {'built' if assets.built_now else 'cached'} in {assets.seconds:.1f} s: "
        f"{assets.package} {assets.version} ({assets.kernel_release}) in {assets.directory}")
    if args.action == "build":
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command")
    results = Path(args.results or tempfile.mkdtemp(prefix="nested-l1-"))
    results.mkdir(parents=True, exist_ok=True)
    env = default_env()
    env["PYTHONUNBUFFERED"] = "1"          # the command's output as it comes, in output.log
    write_run_script(results, command, cwd=args.cwd, env=env,
                     prelude=guest_assets_prelude(env, say))
    run = run_l1(assets, results, timeout=args.timeout, vcpus=args.cpus,
                 echo=None if args.quiet else (lambda line: print(line, flush=True)))
    boot = f"{run.boot_seconds:.1f} s" if run.boot_seconds is not None else "?"
    say(f"L1 run: {run.wall_seconds:.1f} s wall, boot → command {boot}, status {run.status}, "
        f"kvm ready: {run.kvm_ready} ({run.info}); results in {results}")
    if run.crash:
        say(run.crash)
        return 3
    return run.status


if __name__ == "__main__":
    sys.exit(main())
