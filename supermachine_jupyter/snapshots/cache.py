"""The pre-booted snapshot cache: a VM of the default image (or of an OCI image), booted once
and snapshotted, so that later VMs of the same hardware restore (~0.15 s) instead of booting
(~1.4 s).

Keyed by everything that shapes it (kernel and initramfs hashes, memory, vCPUs, balloon,
engine with its version and accelerator, format version, and an OCI image's manifest digest:
one snapshot per image). ``start_with_cache(image, config)``
uses it when the config allows (:func:`cacheable`: no volumes, no mounts, the image's own
kernel): the first start boots and snapshots the fresh VM before handing it over, later
starts restore. :func:`default_snapshot` makes or returns it synchronously. The caller
chooses the policy (``Image.start(snapshot_cache=…)``, ``%config VmMagics.snapshot_cache``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EngineError, VmError
from ..launch import BASE_CMDLINE, restore
from . import store
from .format import (
    FORMAT_VERSION,
    HEADER_FILE,
    Progress,
    Snapshot,
    SnapshotError,
    SnapshotTimeoutError,
    _silent,
    asset_sha256,
)
from .write import begin_snapshot

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..image import Image
    from ..vm import Vm

#: Whether ``%%vm`` cells (``Image.start(..., snapshot_cache=None)``) start from the default
#: image's cached snapshot. On by default: on this workplace's QEMU/TCG a restore reaches
#: the first exec output in ~0.15 s against ~1.5 s for a cold boot (benchmarks/bench_snapshot.py).
#: ``SUPERMACHINE_SNAPSHOT_CACHE=0`` turns it off.
CACHE_ENABLED_BY_DEFAULT = True
#: How long a start waits for this process's first-use snapshot to be finished before it
#: boots instead (finishing takes ~0.8 s here, a boot ~1.4 s).
BACKGROUND_WAIT_S = 3.0


def cache_enabled() -> bool:
    value = os.environ.get("SUPERMACHINE_SNAPSHOT_CACHE")
    if value is None:
        return CACHE_ENABLED_BY_DEFAULT
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def cacheable(image: Image, config: VmConfig) -> str | None:
    """None when the default snapshot can stand in for a boot of ``config``, else why not."""
    if getattr(image, "snapshot", None) is not None:
        return "the image is itself a snapshot"
    if config.volumes:
        return "the VM has volumes"
    if config.mounts:
        return "the VM has mounts"
    if config.assets is not None:
        return "the VM boots its own kernel"
    from ..engines import choose_engine
    try:
        choose_engine(config.engine)
    except EngineError as exc:
        return str(exc)
    return None


def _engine_version(engine: str) -> str:
    """What must match for an engine to load another's snapshot."""
    from ..engines import get
    return get(engine).version_tag()


def _made_by(header: dict) -> tuple[str, str]:
    """(engine, engine version) of a snapshot header, in _engine_version's terms."""
    from ..engines import get
    return header["engine"], get(header["engine"]).made_by(header["engine_state"])


def default_snapshot_key(image: Image, config: VmConfig) -> str:
    from ..engines import choose_engine
    choice = choose_engine(config.engine)
    parts = {
        "format": FORMAT_VERSION, "engine": choice.name,
        "engine_version": _engine_version(choice.name), "accel": choice.accel,
        "kernel": asset_sha256(image.kernel), "initrd": asset_sha256(image.initrd),
        "memory_mib": config.memory_mib or image.default_memory_mib,
        "vcpus": config.vcpus or image.default_vcpus, "balloon": bool(config.balloon),
        "cmdline": BASE_CMDLINE,
    }
    rootfs = getattr(image, "rootfs", None)
    if rootfs is not None:
        # One pre-booted snapshot per OCI image: its RAM holds that image's mounted file
        # system (the file is referenced, not copied; restores check it is the same file).
        parts["image"] = rootfs.digest
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_snapshot(image: Image, config: VmConfig,
                     progress: Progress = _silent) -> Snapshot:
    """The cached pre-booted snapshot of ``image`` for ``config``'s hardware, made on first
    use: boot a template VM, snapshot it, stop it."""
    from ..config import VmConfig
    from ..engines import choose_engine
    key = default_snapshot_key(image, config)
    path = store.snapshots_dir() / f"default-{key}"
    with _locked(store.snapshots_dir() / f"default-{key}.lock"):
        if path.exists():
            try:
                return Snapshot.open(path)
            except SnapshotError as exc:
                progress(f"cached snapshot unusable ({exc}); making it again")
        memory = config.memory_mib or image.default_memory_mib
        vcpus = config.vcpus or image.default_vcpus
        template = VmConfig(memory_mib=memory, vcpus=vcpus, balloon=bool(config.balloon),
                            engine=choose_engine(config.engine).name,
                            vsock_mux_dir=config.vsock_mux_dir)
        progress(f"making the pre-booted snapshot ({memory} MiB, {vcpus} vCPU) for later "
                 "cells…")
        with image.start(template, name="sm-template", progress=progress) as vm:
            made = vm.snapshot(path, overwrite=True)
    _prune_stale_defaults(made)
    return made


def _prune_stale_defaults(current: Snapshot) -> None:
    """Delete cached default snapshots of the same engine made with other kernels, initramfs
    or engine versions, and those of OCI images whose root file system left the image cache
    (running VMs restored from them keep their open files)."""
    h = current.header
    mark = (h["kernel_sha256"], h["initrd_sha256"], *_made_by(h))
    for entry in current.path.parent.glob(".default-*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - entry.stat().st_mtime > 3600:   # left by a process that died
                shutil.rmtree(entry, ignore_errors=True)
    for entry in current.path.parent.glob("default-*"):
        if entry == current.path or not entry.is_dir():
            continue
        try:
            lines = (entry / HEADER_FILE).read_bytes().split(b"\n")
            other = json.loads(lines[1])
            theirs = (other["kernel_sha256"], other["initrd_sha256"], *_made_by(other))
            image_gone = isinstance(other.get("rootfs"), dict) and \
                not os.path.exists(str(other["rootfs"].get("rootfs")))
            if not image_gone and (theirs == mark or theirs[2] != mark[2]):
                continue            # current (or an image's whose file is still cached)
        except (OSError, IndexError, ValueError, KeyError, TypeError, EngineError):
            pass
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            entry.with_name(entry.name + ".lock").unlink()


#: snapshot path → the thread finishing it (this process's first-use snapshots)
_background: dict[Path, threading.Thread] = {}


def start_with_cache(image: Image, config: VmConfig, *, name: str | None = None,
                     progress: Progress = _silent, boot_timeout: float = 120.0) -> Vm:
    """Start a VM of ``image`` from its cached pre-booted snapshot for ``config``'s hardware.

    Without one (first use), boot as usual and snapshot the fresh VM before returning it
    (the guest pauses for a few tens of milliseconds, before it runs anything else); the
    snapshot file is finished in a background thread, so the first VM costs about a cold
    boot and the next ones restore. A cached snapshot that fails to restore falls back to a
    boot (and is made again unless the failure was the restore timeout)."""
    path = store.snapshots_dir() / f"default-{default_snapshot_key(image, config)}"
    remake = True
    pending = _background.get(path)
    if pending is not None:
        pending.join(BACKGROUND_WAIT_S)     # finishing takes less than a boot
    if path.exists():
        try:
            return restore(Snapshot.open(path), config, name=name, progress=progress)
        except SnapshotError as exc:
            progress(f"pre-booted snapshot not used ({exc}); booting")
            remake = not isinstance(exc, SnapshotTimeoutError)
    began = time.time()
    vm = image.start(config, name=name, progress=progress, boot_timeout=boot_timeout,
                     snapshot_cache=False)
    if remake and not remade_since(path, began):
        _snapshot_in_background(vm, path, began)
    return vm


def remade_since(path: Path, when: float) -> bool:
    """Did another start finish the cached snapshot at ``path`` after ``when`` (unix time)?"""
    try:
        return (path / HEADER_FILE).stat().st_mtime >= when
    except OSError:
        return False


def _snapshot_in_background(vm: Vm, path: Path, began: float) -> None:
    """Pause-and-save now, finish in a thread; skipped when another process is making it."""
    try:
        lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115 - held by the thread
    except OSError:
        return          # a read-only cache (shared, pre-filled): it keeps what it has
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return
    if remade_since(path, began):
        lock.close()
        return
    try:
        finish = begin_snapshot(vm, path, overwrite=True)
    except (VmError, OSError):
        lock.close()
        return

    def run() -> None:
        try:
            _prune_stale_defaults(finish())
        except Exception:  # noqa: BLE001, S110 - the cache is best effort; next use retries
            pass
        finally:
            lock.close()

    if not _background:
        atexit.register(wait_for_background, 5.0)
    thread = threading.Thread(target=run, name="snapshot-cache", daemon=True)
    _background[path] = thread
    thread.start()


def wait_for_background(timeout: float | None = None) -> bool:
    """Wait for pre-booted snapshots being finished in the background; True when none is."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in list(_background.values()):
        thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
    return not any(t.is_alive() for t in _background.values())
