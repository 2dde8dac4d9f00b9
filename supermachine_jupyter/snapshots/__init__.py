"""Snapshots: save a running VM to a directory, start new VMs from it instead of booting.

``vm.snapshot(path)`` pauses the guest for a moment, writes its state and resumes it.
``Image.from_snapshot(path).start(config)`` restores: a new engine process loads the state
and the guest carries on exactly where the snapshot left it (files in ``/tmp``, running
processes, the page cache), under a new name and in its own run directory. Every restore is
independent of the others and of the VM the snapshot came from.

A snapshot is a directory::

    header                  versioned, checksummed header (see below)
    volume<i>.img           the data volumes as they were at the snapshot (sparse copies)

A VM of an OCI image keeps its image's root file system where it is (the image cache): the
header's ``rootfs`` entry names the image (ref, digest, config) and its ext4 file with the
file's size and superblock digest, and a restore refuses a file that is gone or differs
(``devices/rootfs.py``). Its writable layer is tmpfs, so it is in guest RAM, in the snapshot.
and the engine's own files. QEMU (``engine_state.qemu_version``):

    qemu-state.migration    QEMU's migration stream: vCPU, irqchip, timers and device state
                            (saved with ``x-ignore-shared``, so without guest RAM)
    qemu-ram.img            guest RAM as a sparse file; every restore maps it copy-on-write
                            (``memory-backend-file,share=off``), so N restores share the
                            pages none of them has written

The native core (``engine_state.core_version``; format in ``native/src/snapshot.h``):

    state.bin               vCPUs, irqchip, PIT, clock, UART and every virtio-mmio device
                            (transport, queue indexes, device state, virtio-fs sessions),
                            versioned, checksummed
    memory.bin              guest RAM as a sparse file, mapped ``MAP_PRIVATE`` by restores

``header`` is three lines: ``SUPERMACHINE-SNAPSHOT <format version>``, one line of JSON (the
engine, its version and accelerator, the ``VmConfig`` as ``to_dict()``, memory and vCPUs,
kernel and initramfs paths with their SHA-256, the creation time, and the size and digest of
every other file), and ``sha256:<hex>`` of that JSON line. Everything is checked before an
engine starts; a snapshot that is truncated, corrupted, from another format version or from
another QEMU version is refused with a :class:`SnapshotError` that says which and why
(the native core checks its own files' format version, sizes and checksum the same way).
A snapshot restores on the engine that made it.

What a restored VM gets:

* its **volumes** are the snapshot's copies, behind a per-VM copy-on-write overlay in its
  run directory (QEMU: qcow2; native: a sparse per-VM copy): the guest's filesystem matches
  its memory, restores never see each other's writes, and the original volume file (which
  the source VM may have changed since) is never touched. Writes end with the VM.
* its **host mounts** (virtio-fs), on the native core: each is re-attached to the snapshot's
  host folder, or to the one the restore config gives (same tag, guest path and read-only
  flag; ``restored_config``), and a folder that is gone is an error naming it. The core saves
  the guest's FUSE session (node ids and open files as paths relative to the mount) and
  resolves it again beneath that folder with a live lookup's confinement: the guest's open
  files and working directory carry on, a file gone by then answers ``ESTALE``, a tampered
  path refuses the restore (``native/src/devices/virtio_fs.h``). The share's contents are the
  host's, not the snapshot's. QEMU refuses to snapshot a VM with mounts (a clear error says
  why: QEMU 7.2's ``vhost-user-fs`` device is not migratable); each engine says which it does
  (``EngineInstance.mounts_not_snapshotted_because``).
* on the native core, **vsock connections** are reset (the guest gets a transport-reset
  event, as on Firecracker); the agent keeps listening and the host connects anew.
* after the agent answers, the host sets the guest's **hostname** to the new VM's name,
  mixes fresh host entropy into ``/dev/urandom`` and sets the guest **clock** (it stood still
  while the snapshot sat on disk).

The default image's pre-booted snapshot is made on first use and cached in the user cache
dir like the kernel, keyed by everything that shapes it (kernel and initramfs hashes, memory,
vCPUs, balloon, engine with its version and accelerator, format version).
``Image.start(config, snapshot_cache=True)`` uses it when the config allows (no volumes, no
mounts, the image's own kernel): the first start boots and snapshots the fresh VM before handing
it over (``cache.start_with_cache``), later starts restore.

The package: ``format`` (the header, digests, checks and :class:`Snapshot`), ``write`` (taking
a snapshot of a running VM), ``store`` (where snapshots live; named snapshots) and ``cache``
(the pre-booted snapshot of the default image; it sits above the launcher, so it is imported
as ``snapshots.cache``, never from here). Restoring is the launcher's (``launch.restore``),
like every other way a VM comes into being.
"""

from .format import (
                     FORMAT_VERSION,
                     Snapshot,
                     SnapshotError,
                     SnapshotNotSupportedError,
                     SnapshotTimeoutError,
                     SnapshotVersionError,
)
from .store import list_snapshots, named_snapshot_path, snapshots_dir
from .write import begin_snapshot, write_snapshot

__all__ = [
    "FORMAT_VERSION",
    "Snapshot",
    "SnapshotError",
    "SnapshotNotSupportedError",
    "SnapshotTimeoutError",
    "SnapshotVersionError",
    "begin_snapshot",
    "list_snapshots",
    "named_snapshot_path",
    "snapshots_dir",
    "write_snapshot",
]
