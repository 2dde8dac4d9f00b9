"""The snapshot format: a directory with a versioned, checksummed ``header``, the digests of
its files, the checks made before any engine starts, and :class:`Snapshot` (a directory
whose header has been checked). What a snapshot holds and what a restored VM gets: the
package's docstring (``snapshots/__init__.py``).

``header`` is three lines: ``SUPERMACHINE-SNAPSHOT <format version>``, one line of JSON (the
engine, its version and accelerator, the ``VmConfig`` as ``to_dict()``, memory and vCPUs,
kernel and initramfs paths with their SHA-256, the creation time, and the size and digest of
every other file), and ``sha256:<hex>`` of that JSON line. The checksum catches damage, not
tampering (anyone can recompute it), so the header is treated as host input: every field a
restore reads is type-checked and every file it names must be a plain name inside the
directory. A snapshot that is truncated, corrupted, from another format version or from
another engine version is refused with a :class:`SnapshotError` that says which and why.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (  # noqa: F401  (re-exported: the snapshot errors are this package's too)
    SnapshotError,
    SnapshotNotSupportedError,
    SnapshotTimeoutError,
    SnapshotVersionError,
    VmError,
)

if TYPE_CHECKING:
    from ..config import VmConfig

MAGIC = "SUPERMACHINE-SNAPSHOT"
FORMAT_VERSION = 1
HEADER_FILE = "header"
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Digest of a sparse file: SHA-256 over (offset, bytes) of every non-zero 64 KiB chunk, so it
#: does not depend on how the file system stores holes (a plain copy gives the same digest).
CONTENT_DIGEST = "sha256-nonzero-64k"
_CHUNK = 64 * 1024
_BLOCK = 1024 * 1024
_ZERO_CHUNK = bytes(_CHUNK)

#: Engines whose snapshots this build writes and restores.
SNAPSHOT_ENGINES = ("qemu", "native")

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


# --- digests --------------------------------------------------------------------------------

def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the parts of a file that hold data (holes skipped where supported)."""
    ranges, offset = [], 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            offset = end
    except (OSError, AttributeError):
        return [(0, size)]
    return ranges


def content_digest(path: Path) -> str:
    """See CONTENT_DIGEST. Reads only the file's data extents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        done = 0                                   # blocks below this offset are hashed
        for start, end in _data_ranges(fd, size):
            block = max(start // _BLOCK * _BLOCK, done)
            while block < end:
                data = os.pread(fd, _BLOCK, block)
                view = memoryview(data)
                for off in range(0, len(data), _CHUNK):
                    chunk = view[off:off + _CHUNK]
                    if chunk != _ZERO_CHUNK[:len(chunk)]:
                        h.update((block + off).to_bytes(8, "little"))
                        h.update(chunk)
                block += _BLOCK
            done = block
    return f"{CONTENT_DIGEST}:{h.hexdigest()}"


@functools.lru_cache(maxsize=256)
def _content_digest_of(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return content_digest(Path(path))


def checked_content_digest(path: Path) -> str:
    """``content_digest``, read once per process for a file that has not changed since (same
    inode, size, mtime and ctime): restores after the first do not hash guest RAM again."""
    st = os.stat(path)
    return _content_digest_of(str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def asset_sha256(path: Path) -> str | None:
    """SHA-256 of a kernel or initramfs (cached by path, size and mtime); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _cached_sha256(str(path), st.st_size, st.st_mtime_ns)


# --- the header -----------------------------------------------------------------------------

def encode_header(fields: dict) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return (f"{MAGIC} {fields['format_version']}\n".encode() + body + b"\n"
            + f"sha256:{hashlib.sha256(body).hexdigest()}\n".encode())


def decode_header(data: bytes, where: str) -> dict:
    """Check and parse a header; SnapshotError says what is wrong."""
    first, _, rest = data.partition(b"\n")
    if not first.startswith(MAGIC.encode()):
        raise SnapshotError(f"{where} is not a supermachine snapshot: its header does not "
                            f"start with {MAGIC!r} (bad magic)")
    try:
        version = int(first[len(MAGIC):].strip() or b"x")
    except ValueError:
        raise SnapshotError(f"snapshot {where} is corrupted: unreadable format version "
                            f"{first[len(MAGIC):]!r} in its header") from None
    if version != FORMAT_VERSION:
        raise SnapshotVersionError(
            f"snapshot {where} has format version {version}; this supermachine_jupyter reads "
            f"version {FORMAT_VERSION} only: make the snapshot again with this version")
    body, _, tail = rest.partition(b"\n")
    if not tail.endswith(b"\n") or not tail.startswith(b"sha256:"):
        raise SnapshotError(f"snapshot {where} is truncated: its header ends before its "
                            "checksum line")
    if tail.strip() != f"sha256:{hashlib.sha256(body).hexdigest()}".encode():
        raise SnapshotError(f"snapshot {where} is corrupted: the header's checksum does not "
                            "match its contents")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as exc:     # RecursionError: absurdly nested JSON
        raise SnapshotError(f"snapshot {where} is corrupted: header is not JSON ({exc})") from exc
    if not isinstance(fields, dict) or fields.get("format_version") != version:
        raise SnapshotError(f"snapshot {where} is corrupted: header fields disagree with its "
                            "format version")
    _check_fields(fields, where)
    return fields


def _is_plain_file_name(name: object) -> bool:
    """A name of a file directly inside the snapshot directory (no separator, not . or ..)."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name
            and "\0" not in name and name not in (".", ".."))


def _check_fields(fields: dict, where: str) -> None:
    """Every field a restore reads, with its type; every file the header names is a plain
    file name listed in ``files``. The checksum can be recomputed by whoever edits a header,
    so a header is host input like any other: nothing in it may point outside the snapshot
    directory or reach the code below as a wrong type."""
    def corrupt(what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {where} is corrupted: header {what}")

    def want(container: dict, key: str, kind, label: str):
        if key not in container:
            raise corrupt(f"lacks {label}")
        value = container[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise corrupt(f"field {label} is {type(value).__name__}, not "
                          f"{getattr(kind, '__name__', 'the right type')}")
        return value

    missing = [k for k in ("engine", "config", "memory_mib", "vcpus", "files", "volumes",
                           "engine_state", "created_at") if k not in fields]
    if missing:
        raise corrupt(f"lacks {', '.join(missing)}")
    for key, kind in (("engine", str), ("config", dict), ("memory_mib", int), ("vcpus", int),
                      ("files", dict), ("volumes", list), ("engine_state", dict),
                      ("created_at", str), ("kernel", str), ("initrd", str),
                      ("cmdline", str)):
        want(fields, key, kind, key)
    if fields["memory_mib"] <= 0 or fields["vcpus"] <= 0:
        raise corrupt("gives no memory or no vCPUs")
    files = fields["files"]
    for name, info in files.items():
        if not _is_plain_file_name(name):
            raise corrupt(f"names file {name!r}, which is not a plain file name inside the "
                          "snapshot directory")
        if not isinstance(info, dict):
            raise corrupt(f"entry of {name!r} is not an object")
        if want(info, "size", int, f"files[{name!r}].size") < 0:
            raise corrupt(f"gives {name!r} a negative size")
        if "sha256" not in info and "digest" not in info:
            raise corrupt(f"gives {name!r} neither a sha256 nor a digest")
        for key in ("sha256", "digest"):
            if key in info:
                want(info, key, str, f"files[{name!r}].{key}")
    state = fields["engine_state"]
    for key in ("state_file", "ram_file"):
        if want(state, key, str, f"engine_state.{key}") not in files:
            raise corrupt(f"engine_state.{key} {state[key]!r} is not one of its files")
    if "sha256" not in files[state["state_file"]]:
        raise corrupt(f"gives the state file {state['state_file']!r} no sha256")
    if "balloon_target_mib" in fields and want(fields, "balloon_target_mib", int,
                                              "balloon_target_mib") < 0:
        raise corrupt("gives a negative balloon size")
    if fields.get("rootfs") is not None:
        from ..devices.rootfs import check_record
        problem = check_record(fields["rootfs"])
        if problem is not None:
            raise corrupt(problem)
    for i, volume in enumerate(fields["volumes"]):
        if not isinstance(volume, dict):
            raise corrupt(f"volumes[{i}] is not an object")
        if want(volume, "file", str, f"volumes[{i}].file") not in files:
            raise corrupt(f"volumes[{i}].file {volume['file']!r} is not one of its files")
        want(volume, "read_only", bool, f"volumes[{i}].read_only")
        want(volume, "serial", str, f"volumes[{i}].serial")


def _mount_shape(mount: object) -> tuple:
    """What a restore keeps of a mount: all but its host folder, which it may move."""
    if not isinstance(mount, dict):
        return (mount,)
    return (mount.get("tag"), mount.get("guest_path"), bool(mount.get("read_only")))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A snapshot directory whose header has been checked. ``Snapshot.open(path)``."""
    path: Path
    header: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> Snapshot:
        """Read and check the header, and that every file is there with its recorded size."""
        path = Path(path).expanduser().absolute()
        if path.is_file() and path.name == HEADER_FILE:
            path = path.parent
        if not path.exists():
            raise SnapshotError(f"snapshot {path} does not exist")
        head = path / HEADER_FILE
        if not path.is_dir() or not head.is_file():
            raise SnapshotError(f"{path} is not a supermachine snapshot: no {HEADER_FILE} file "
                                "in it (a snapshot is a directory made by Vm.snapshot)")
        with open(head, "rb") as f:
            data = f.read(MAX_HEADER_BYTES + 1)
        if len(data) > MAX_HEADER_BYTES:
            raise SnapshotError(f"snapshot {path} is corrupted: header larger than "
                                f"{MAX_HEADER_BYTES} bytes")
        fields = decode_header(data, str(path))
        if fields["engine"] not in SNAPSHOT_ENGINES:
            raise SnapshotError(f"snapshot {path} was made by engine {fields['engine']!r}, which "
                                "this build cannot restore")
        for name, info in fields["files"].items():
            file = path / name
            if file.is_symlink():
                # A link could hand the guest any host file as its RAM or a volume.
                raise SnapshotError(f"snapshot {path} is corrupted: {name} is a symbolic link "
                                    "(a snapshot holds its files itself)")
            if not file.is_file():
                raise SnapshotError(f"snapshot {path} is incomplete: {name} is missing")
            size = file.stat().st_size
            if size < info["size"]:
                raise SnapshotError(f"snapshot {path} is truncated: {name} has {size} bytes, "
                                    f"the header says {info['size']}")
            if size != info["size"]:
                raise SnapshotError(f"snapshot {path} is corrupted: {name} has {size} bytes, "
                                    f"the header says {info['size']}")
        return cls(path, fields)

    # -- what it holds ----------------------------------------------------------------------
    @property
    def engine(self) -> str:
        return self.header["engine"]

    @property
    def accel(self) -> str:
        return self.header["engine_state"].get("accel", "tcg")

    @property
    def memory_mib(self) -> int:
        return self.header["memory_mib"]

    @property
    def vcpus(self) -> int:
        return self.header["vcpus"]

    @property
    def created_at(self) -> str:
        return self.header["created_at"]

    @property
    def source_name(self) -> str:
        return self.header.get("source_vm", "?")

    def __repr__(self) -> str:
        return (f"<Snapshot {str(self.path)!r} of {self.source_name!r} {self.engine}/"
                f"{self.accel} {self.memory_mib}MiB {self.vcpus}vCPU {self.created_at}>")

    # -- checks --------------------------------------------------------------------------------
    def check_host(self) -> None:
        """Refuse a snapshot this host's engine cannot load (other QEMU, no KVM, no core)."""
        from ..engines import get
        problem = get(self.engine).restore_problem(self.header["engine_state"])
        if problem is not None:
            error = SnapshotVersionError if problem.other_version else SnapshotError
            raise error(f"snapshot {self.path} {problem.message}")

    def verify_state(self) -> None:
        """SHA-256 of the engine's state stream against the header."""
        name = self.header["engine_state"]["state_file"]
        if file_sha256(self.path / name) != self.header["files"][name]["sha256"]:
            raise SnapshotError(f"snapshot {self.path} is corrupted: {name} does not match "
                                "the checksum in its header")

    def verify_contents(self) -> None:
        """Digests of guest RAM and the volume copies against the header (a file verified
        before in this process and unchanged since is not read again)."""
        for name, info in self.header["files"].items():
            if "digest" in info and checked_content_digest(self.path / name) != info["digest"]:
                raise SnapshotError(f"snapshot {self.path} is corrupted: {name} does not "
                                    "match the digest in its header")

    def restored_config(self, config: VmConfig) -> VmConfig:
        """The config of a VM restored with ``config``: the snapshot's hardware (memory,
        vCPUs, balloon, volumes, mounts) with the caller's name, run directory and timeout.
        Mounts are re-attached to the same host folders, or to the ones ``config.mounts``
        gives (same tags, guest paths and read-only flags). A ``config`` that asks for
        different hardware is refused; so is a mount whose host folder is gone."""
        from traitlets import TraitError

        from ..config import VmConfig
        saved = dict(self.header["config"])
        conflicts = []
        if config.engine not in ("auto", self.engine):
            conflicts.append(f"engine={config.engine!r} (snapshot made by {self.engine!r})")
        if config.memory_mib not in (None, self.memory_mib):
            conflicts.append(f"memory_mib={config.memory_mib} (snapshot: {self.memory_mib})")
        if config.vcpus not in (None, self.vcpus):
            conflicts.append(f"vcpus={config.vcpus} (snapshot: {self.vcpus})")
        if config.balloon and not saved.get("balloon"):
            conflicts.append("balloon=True (the snapshot has no balloon)")
        if config.volumes and [v.to_dict() for v in config.volumes] != saved.get("volumes"):
            conflicts.append("volumes differ from the snapshot's")
        saved_mounts = saved.get("mounts") or []
        if config.mounts and [_mount_shape(m.to_dict()) for m in config.mounts] != \
                [_mount_shape(m) for m in saved_mounts]:
            conflicts.append("mounts differ from the snapshot's (a restore may move a mount to "
                             "another host folder; its tag, guest path and read-only flag stay)")
        if conflicts:
            raise SnapshotError(
                f"snapshot {self.path} cannot be restored with {'; '.join(conflicts)}: a "
                "restore keeps the snapshot's hardware and engine (leave those fields unset)")
        saved.update(name=config.name, restore_timeout=config.restore_timeout,
                     vsock_mux_dir=config.vsock_mux_dir, engine=self.engine, assets=None)
        if config.mounts:
            saved["mounts"] = [m.to_dict() for m in config.mounts]
        else:
            for mount in saved_mounts:
                folder = mount.get("host_path") if isinstance(mount, dict) else None
                if not isinstance(folder, str) or not os.path.isdir(folder):
                    tag = mount.get("tag") if isinstance(mount, dict) else "?"
                    raise SnapshotError(
                        f"snapshot {self.path}: its mount {tag!r} re-attaches host folder "
                        f"{folder}, which is not a directory here: create it, or give the "
                        "mount with another folder in the restore config (VmConfig(mounts="
                        "[MountSpec(<folder>, <same tag>, <same guest path>)]))")
        saved_volumes = saved.get("volumes")
        if not isinstance(saved_volumes, list) or len(saved_volumes) != len(self.header["volumes"]) \
                or not all(isinstance(v, dict) for v in saved_volumes):
            raise SnapshotError(f"snapshot {self.path} is corrupted: its config's volumes do "
                                "not match the volume files it lists")
        try:
            return VmConfig.from_dict(saved)
        except (TraitError, TypeError, ValueError):
            # A volume's original directory is gone: the restore uses the snapshot's copy.
            saved["volumes"] = [dict(v, host_path=str(self.path / saved_file["file"]))
                                for v, saved_file in zip(saved_volumes, self.header["volumes"])]
            try:
                return VmConfig.from_dict(saved)
            except (TraitError, TypeError, ValueError) as exc:
                raise SnapshotError(f"snapshot {self.path}: its config is not valid here: "
                                    f"{exc}") from exc
