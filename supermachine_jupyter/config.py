"""Configuration of one microVM: :class:`VmConfig` and the value objects it holds.

It follows the configuration model of the supermachine microVM runtime (its Rust ``VmConfig``,
which is not part of this repository): memory, vCPUs,
virtio-balloon, virtio-blk data volumes (:class:`VolumeSpec`), virtio-fs host directory mounts
(:class:`MountSpec`), the guest kernel and initramfs (:class:`AssetPaths`), the vsock-mux socket
directory, the snapshot restore timeout, the engine and an optional VM name.
``VmConfig()`` with nothing set means "the image's baked defaults".

Two spellings build the same configuration::

    VmConfig().with_memory_mib(512).with_vcpus(2)     # the runtime's builder; each with_* returns a
    VmConfig(memory_mib=512, vcpus=2)                 # NEW config and leaves the old one alone

``VmConfig`` is a :class:`traitlets.HasTraits`, so widgets can observe and edit it; every
field carries ``help=`` text (see :meth:`VmConfig.field_help`). Every invalid value raises
:class:`traitlets.TraitError` whose message names the field and says what it accepts::

    VmConfig.memory_mib must be None or an integer from 64 to 23978 MiB (host RAM), got 0

The value objects are immutable and validated when they are made. Host paths are checked
against the filesystem at that moment and stored absolute; guest paths are checked only by
their spelling (absolute, no ``..``) and stored in a canonical form, so ``/data/`` and
``/data`` count as the same mount point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import textwrap
from collections.abc import Mapping
from typing import Any

from traitlets import (
    Bool,
    Enum,
    Float,
    HasTraits,
    Instance,
    Int,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)

__all__ = [
    "AssetPaths",
    "ENGINES",
    "FIELDS",
    "MountSpec",
    "VmConfig",
    "VolumeSpec",
    "host_cpu_count",
    "host_memory_mib",
]

# --- limits (units in the names) --------------------------------------------------------------

MIN_MEMORY_MIB = 64
DEFAULT_VOLUME_SIZE_MIB = 1024
MAX_VOLUME_SIZE_MIB = 1024 * 1024  # 1 TiB
# At most 20 data volumes (virtio-blk disks; the guest mounts each by its serial number).
MAX_VOLUMES = 20
# virtio-fs puts the tag in a fixed 36-byte field of the device's config space.
MAX_TAG_CHARS = 36
# sun_path holds 108 bytes on Linux (104 on macOS); the vsock-mux socket's file name is
# appended to the directory, so the directory gets 80 and the name keeps the rest.
MAX_VSOCK_MUX_DIR_BYTES = 80
MAX_RESTORE_TIMEOUT_S = 3600.0
DEFAULT_RESTORE_TIMEOUT_S = 10.0

ENGINES = ("auto", "native", "qemu")

_TAG_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TAG_CHARS}}}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def host_memory_mib() -> int:
    """Physical RAM of this host in MiB: the upper bound of ``VmConfig.memory_mib``."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def host_cpu_count() -> int:
    """CPUs of this host: the upper bound of ``VmConfig.vcpus``."""
    return os.cpu_count() or 1


# --- shared checks ----------------------------------------------------------------------------


def _invalid(owner: str, field: str, allowed: str, value: Any, detail: str = "") -> TraitError:
    """The one shape of every error in this module: owner.field must be <allowed>, got <value>."""
    return TraitError(f"{owner}.{field} must be {allowed}, got {value!r}{detail}")


def _is_int(value: Any) -> bool:
    # True is an int in Python, but memory_mib=True is a mistake, not 1 MiB.
    return isinstance(value, int) and not isinstance(value, bool)


# The guest's init reads mount points from the kernel command line ("sm.vol=SERIAL:PATH:rw,…"),
# where a space ends the argument and ',' and ':' separate entries: such characters would
# silently mount elsewhere, so guest paths use a plain alphabet and a bounded length.
MAX_GUEST_PATH_CHARS = 128
_GUEST_PATH_CHARS_RE = re.compile(r"[A-Za-z0-9/._+@~-]+")
_GUEST_PATH_ALLOWED = (
    f"an absolute guest path other than '/' of at most {MAX_GUEST_PATH_CHARS} characters from "
    "A-Z a-z 0-9 / . _ - + @ ~ (no '..' components)"
)


def _guest_path(owner: str, value: Any) -> str:
    """Check a guest mount point and return its canonical spelling.

    Repeated slashes, '.' components and a trailing slash are dropped (they name the same
    directory); '..' is refused rather than resolved, because what it means depends on
    symlinks inside the guest.
    """
    if not isinstance(value, str) or not value.startswith("/"):
        raise _invalid(owner, "guest_path", _GUEST_PATH_ALLOWED, value)
    if not _GUEST_PATH_CHARS_RE.fullmatch(value):
        bad = sorted({c for c in value if not _GUEST_PATH_CHARS_RE.fullmatch(c)})
        raise _invalid(owner, "guest_path", _GUEST_PATH_ALLOWED, value,
                       f" (contains {', '.join(map(repr, bad))})")
    if len(value) > MAX_GUEST_PATH_CHARS:
        raise _invalid(owner, "guest_path", _GUEST_PATH_ALLOWED, value,
                       f" ({len(value)} characters)")
    parts = value.split("/")
    if ".." in parts:
        raise _invalid(owner, "guest_path", _GUEST_PATH_ALLOWED, value)
    canonical = "/" + "/".join(part for part in parts if part not in ("", "."))
    if canonical == "/":
        raise _invalid(owner, "guest_path", _GUEST_PATH_ALLOWED, value)
    return canonical


def _host_path(owner: str, field: str, allowed: str, value: Any) -> str:
    """A host path as an absolute string ('~' expanded); the caller checks what it points at."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise _invalid(owner, field, allowed, value)
    return os.path.abspath(os.path.expanduser(value))


def _vsock_mux_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot hold the vsock-mux socket, or None when it can."""
    length_bytes = len(os.fsencode(path))
    if length_bytes > MAX_VSOCK_MUX_DIR_BYTES:
        return f" ({length_bytes} bytes: too long for the socket path to fit in sun_path)"
    if not os.path.exists(path):
        return " (does not exist)"
    if not os.path.isdir(path):
        return " (not a directory)"
    return None


# --- value objects ----------------------------------------------------------------------------


class _Spec:
    """Dict conversion shared by the value objects (all of them are flat dataclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Any):
        """Build from a dict made by :meth:`to_dict`; unknown or missing keys raise TraitError."""
        names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        required = [
            field.name
            for field in dataclasses.fields(cls)  # type: ignore[arg-type]
            if field.default is dataclasses.MISSING
        ]
        if not isinstance(data, Mapping):
            raise TraitError(
                f"{cls.__name__} must be given as a dict with keys {', '.join(names)}, "
                f"got {data!r}"
            )
        unknown = sorted(set(data) - set(names), key=str)
        if unknown:
            raise TraitError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                f"its fields are {', '.join(names)}"
            )
        missing = [name for name in required if name not in data]
        if missing:
            raise TraitError(f"{cls.__name__} needs {', '.join(missing)} (missing from {data!r})")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class VolumeSpec(_Spec):
    """A virtio-blk data volume: a sparse host file, formatted ext4 on first use.

    The file is reused on later runs, so what the guest writes under ``guest_path`` persists.
    Volumes attach in order as virtio-blk disks (/dev/vda, /dev/vdb, …: the root filesystem is
    the initramfs, so there is no root disk); the guest mounts each one by its serial.

    - ``host_path``: the image file on the host. It may not exist yet (it is created on first
      use), but its directory must. Stored absolute.
    - ``guest_path``: where the guest mounts it, e.g. ``/data``.
    - ``size_mib``: size of the sparse file in MiB, 1 … 1048576 (1 TiB); None (the default)
      means 1024 MiB for a new file and the file's own size for an existing one. A volume is
      never resized: a ``size_mib`` that differs from an existing file's size is an error.
    - ``read_only``: attach the disk read-only (the file must exist).
    """

    host_path: str
    guest_path: str
    size_mib: int | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        owner = "VolumeSpec"
        allowed = "a host file path whose directory exists (the file is created on first use)"
        host_path = _host_path(owner, "host_path", allowed, self.host_path)
        if os.path.isdir(host_path):
            raise _invalid(owner, "host_path", allowed, self.host_path, " (a directory)")
        if not os.path.isdir(os.path.dirname(host_path)):
            raise _invalid(
                owner, "host_path", allowed, self.host_path, " (directory does not exist)"
            )
        if self.size_mib is not None and (
            not _is_int(self.size_mib) or not 1 <= self.size_mib <= MAX_VOLUME_SIZE_MIB
        ):
            allowed_size = f"None or an integer from 1 to {MAX_VOLUME_SIZE_MIB} MiB (1 TiB)"
            raise _invalid(owner, "size_mib", allowed_size, self.size_mib)
        if not isinstance(self.read_only, bool):
            raise _invalid(owner, "read_only", "True or False", self.read_only)
        # Frozen dataclass: store the normalised spellings through object.__setattr__.
        object.__setattr__(self, "host_path", host_path)
        object.__setattr__(self, "guest_path", _guest_path(owner, self.guest_path))


@dataclasses.dataclass(frozen=True)
class MountSpec(_Spec):
    """A virtio-fs mount of a host directory into the guest.

    - ``host_path``: an existing host directory; the guest sees only what is beneath it.
      Stored absolute.
    - ``tag``: the virtio-fs tag the guest mounts by, 1 … 36 of ``A-Z a-z 0-9 _ -``.
    - ``guest_path``: where the guest mounts it, e.g. ``/mnt/host``.
    - ``read_only``: mount read-only.
    """

    host_path: str
    tag: str
    guest_path: str
    read_only: bool = False

    def __post_init__(self) -> None:
        owner = "MountSpec"
        allowed = "an existing host directory"
        host_path = _host_path(owner, "host_path", allowed, self.host_path)
        if not os.path.exists(host_path):
            raise _invalid(owner, "host_path", allowed, self.host_path, " (does not exist)")
        if not os.path.isdir(host_path):
            raise _invalid(owner, "host_path", allowed, self.host_path, " (not a directory)")
        if not isinstance(self.tag, str) or not _TAG_RE.fullmatch(self.tag):
            raise _invalid(
                owner, "tag", f"1 to {MAX_TAG_CHARS} characters from A-Z a-z 0-9 _ -", self.tag
            )
        if not isinstance(self.read_only, bool):
            raise _invalid(owner, "read_only", "True or False", self.read_only)
        object.__setattr__(self, "host_path", host_path)
        object.__setattr__(self, "guest_path", _guest_path(owner, self.guest_path))


@dataclasses.dataclass(frozen=True)
class AssetPaths(_Spec):
    """The guest kernel (``kernel``, a bzImage/Image) and initramfs (``initrd``) to boot.

    Both files must exist; both are stored absolute. ``VmConfig.assets = None`` instead lets
    the engine discover (or build) them.
    """

    kernel: str
    initrd: str

    def __post_init__(self) -> None:
        for field in ("kernel", "initrd"):
            given = getattr(self, field)
            path = _host_path("AssetPaths", field, "an existing file", given)
            if not os.path.isfile(path):
                detail = " (not a file)" if os.path.exists(path) else " (does not exist)"
                raise _invalid("AssetPaths", field, "an existing file", given, detail)
            object.__setattr__(self, field, path)


# --- VmConfig's trait types -------------------------------------------------------------------
#
# traitlets checks a value's type before any @validate method sees it, with its own wording
# ("The 'vcpus' trait of a VmConfig instance expected an int…") and some leniency we do not
# want (Int takes True and 512.0, Float turns True into 1.0, Bool takes 0 and 1, Unicode
# decodes bytes).
# These subclasses make the type check strict and word its failure like every other error.


def _allowed(field: str) -> str:
    """What ``VmConfig.<field>`` accepts, as the error messages say it."""
    return {
        "memory_mib": (
            f"None or an integer from {MIN_MEMORY_MIB} to {host_memory_mib()} MiB (host RAM)"
        ),
        "vcpus": f"None or an integer from 1 to {host_cpu_count()} (host CPUs)",
        "balloon": "True or False",
        "volumes": f"a list of at most {MAX_VOLUMES} VolumeSpec (virtio-blk disks)",
        "mounts": "a list of MountSpec",
        "assets": "None (auto-discover) or an AssetPaths",
        "vsock_mux_dir": (
            f"an existing directory whose path is at most {MAX_VSOCK_MUX_DIR_BYTES} bytes "
            "(the vsock-mux unix socket inside it must fit in sun_path)"
        ),
        "restore_timeout": (
            f"a number of seconds greater than 0 and at most {MAX_RESTORE_TIMEOUT_S:g}"
        ),
        "engine": "one of " + ", ".join(map(repr, ENGINES)),
        "name": (
            "None or a name of 1 to 63 characters: a letter or digit, "
            "then letters, digits, '_', '.' or '-'"
        ),
    }[field]


class _FieldTrait:
    """Mixin: a wrong type raises "VmConfig.<field> must be …, got …" like a wrong value."""

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None):
        owner = type(obj).__name__ if obj is not None else "VmConfig"
        raise _invalid(owner, self.name, _allowed(self.name), value)  # type: ignore[attr-defined]


class _Int(_FieldTrait, Int):
    def validate(self, obj: Any, value: Any) -> Any:
        # Strict, like VolumeSpec.size_mib: traitlets would also take True and 512.0.
        if not _is_int(value):
            self.error(obj, value)
        return value


class _Float(_FieldTrait, Float):
    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, bool):
            self.error(obj, value)
        return super().validate(obj, value)  # ints become floats here


class _Bool(_FieldTrait, Bool):
    def validate(self, obj: Any, value: Any) -> Any:
        if not isinstance(value, bool):
            self.error(obj, value)
        return value


class _Path(_FieldTrait, Unicode):
    """A str (or os.PathLike, stored as str); empty is refused here, the rest in @validate."""

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            self.error(obj, value)
        return value


class _Str(_FieldTrait, Unicode):
    def validate(self, obj: Any, value: Any) -> Any:
        if not isinstance(value, str):
            self.error(obj, value)
        return value


class _Enum(_FieldTrait, Enum):
    pass


class _Instance(_FieldTrait, Instance):
    pass


class _SpecList(_FieldTrait, List):
    """A list of one spec type, checked as a whole so the error shows what the user gave."""

    def __init__(self, spec_type: type, **kwargs: Any) -> None:
        self.spec_type = spec_type
        super().__init__(Instance(spec_type), **kwargs)

    def set(self, obj: Any, value: Any) -> None:
        # List.set would quietly wrap a str in a list; let validate() refuse it instead.
        super(List, self).set(obj, value)

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, self.spec_type) for v in value):
            self.error(obj, value)
        # A copy: appending to the caller's list later must not change this config unchecked.
        return list(value)


# --- VmConfig ---------------------------------------------------------------------------------

#: VmConfig's field names, in the order of the runtime's ``VmConfig`` (and of repr/to_dict).
FIELDS = (
    "memory_mib",
    "vcpus",
    "balloon",
    "volumes",
    "mounts",
    "assets",
    "vsock_mux_dir",
    "restore_timeout",
    "engine",
    "name",
)


class VmConfig(HasTraits):
    """How to build one microVM; nothing set means "the image's baked defaults".

    Build it with keywords, ``VmConfig(memory_mib=512, vcpus=2)``, or with the builder,
    ``VmConfig().with_memory_mib(512).with_vcpus(2)``: each ``with_*`` method and
    :meth:`replace` return a new config and leave this one unchanged. Assigning a field
    (``config.vcpus = 4``) changes this config in place and notifies traitlets observers,
    which is how the configuration widgets edit it. Assign whole lists to ``volumes`` and
    ``mounts``; appending to them in place bypasses validation.

    Every invalid value raises :class:`traitlets.TraitError` naming the field and what it
    accepts. Guest paths must be unique across volumes and mounts, and mount tags unique.

    :meth:`to_dict` / :meth:`from_dict` and :meth:`to_json` / :meth:`from_json` round-trip
    exactly; :meth:`field_help` lists the fields with their help text.
    """

    memory_mib = _Int(
        None,
        allow_none=True,
        help=(
            "Guest RAM in MiB. None keeps the image's default; otherwise from "
            f"{MIN_MEMORY_MIB} MiB up to the host's physical RAM."
        ),
    )
    vcpus = _Int(
        None,
        allow_none=True,
        help=(
            "Number of virtual CPUs. None keeps the image's default; otherwise from 1 up to "
            "the host's CPU count."
        ),
    )
    balloon = _Bool(
        False,
        help=(
            "Attach a virtio-balloon device (with the statistics queue) so the host can "
            "reclaim guest memory and watch its use while the VM runs."
        ),
    )
    volumes = _SpecList(
        VolumeSpec,
        help=(
            f"virtio-blk data volumes (VolumeSpec), attached in order as /dev/vda, /dev/vdb … "
            f"(at most {MAX_VOLUMES}). Each is a sparse host file, formatted ext4 on first use "
            "and reused afterwards, so its data persists."
        ),
    )
    mounts = _SpecList(
        MountSpec,
        help=(
            "virtio-fs host directory mounts (MountSpec). Tags must be unique, and guest paths "
            "unique across volumes and mounts."
        ),
    )
    assets = _Instance(
        AssetPaths,
        allow_none=True,
        help="Guest kernel and initramfs to boot (AssetPaths). None discovers them automatically.",
    )
    vsock_mux_dir = _Path(
        help=(
            "Directory for the host-side unix socket of the vsock multiplexer and each VM's "
            "private run directory (its sockets and per-VM files). Defaults to $TMPDIR. Must "
            f"exist, and be at most {MAX_VSOCK_MUX_DIR_BYTES} bytes long so the socket path "
            "fits in sun_path."
        ),
    )
    restore_timeout = _Float(
        DEFAULT_RESTORE_TIMEOUT_S,
        help=(
            "Seconds to wait for a VM to restore from a snapshot before giving up "
            f"(greater than 0, at most {MAX_RESTORE_TIMEOUT_S:g})."
        ),
    )
    engine = _Enum(
        list(ENGINES),
        default_value="auto",
        help=(
            "What runs the VM: 'native' (the KVM core in this package), 'qemu', or 'auto' "
            "(native when /dev/kvm runs guests at hardware speed, else QEMU)."
        ),
    )
    name = _Str(
        None,
        allow_none=True,
        help=(
            "Optional VM name (as in %%vm --name) under which the VM stays up between cells: "
            "a letter or digit, then up to 62 letters, digits, '_', '.' or '-'. None = unnamed."
        ),
    )

    def __init__(self, **fields: Any) -> None:
        unknown = [key for key in fields if key not in FIELDS]
        if unknown:
            # HasTraits would hand unknown keywords on to object.__init__ and fail obscurely.
            raise TypeError(
                f"VmConfig() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the fields are: {', '.join(FIELDS)}"
            )
        super().__init__()
        # Read every default now. traitlets rolls a failed multi-field assignment back to the
        # values it has seen, and for a never-read field that is the static default ("" for
        # vsock_mux_dir), which is invalid and would mask the real error. It also pins $TMPDIR
        # when the config is made, not whenever the field happens to be read first.
        for name in FIELDS:
            getattr(self, name)
        self._assign(fields)

    def _assign(self, values: Mapping[str, Any]) -> None:
        """Set several fields at once, in FIELDS order.

        Each value's type is checked as it is set; the @validate checks (ranges and the
        cross-field ones) run when all are set, only for the fields that changed, so an error
        names the field being changed. On any error traitlets rolls every value back.
        """
        with self.hold_trait_notifications():
            for name in FIELDS:
                if name in values:
                    setattr(self, name, values[name])

    # -- defaults and validation ---------------------------------------------------------------

    @default("vsock_mux_dir")
    def _default_vsock_mux_dir(self) -> str:
        # $TMPDIR as in the supermachine runtime. A default must never be the reason a config is invalid,
        # so when $TMPDIR is missing or too long for sun_path (a deep macOS per-user dir can be)
        # fall back to the system temp dir, then /tmp.
        system_tmp = tempfile.gettempdir()
        candidates = (os.environ.get("TMPDIR", system_tmp), system_tmp, "/tmp")
        for candidate in candidates:
            path = os.path.abspath(os.path.expanduser(candidate))
            if _vsock_mux_dir_problem(path) is None:
                return path
        return os.path.abspath(candidates[0])

    def _invalid(self, field: str, value: Any, detail: str = "") -> TraitError:
        return _invalid(type(self).__name__, field, _allowed(field), value, detail)

    @validate("memory_mib")
    def _validate_memory_mib(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None and not MIN_MEMORY_MIB <= value <= host_memory_mib():
            raise self._invalid("memory_mib", value)
        return value

    @validate("vcpus")
    def _validate_vcpus(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None and not 1 <= value <= host_cpu_count():
            raise self._invalid("vcpus", value)
        return value

    @validate("vsock_mux_dir")
    def _validate_vsock_mux_dir(self, proposal: Any) -> str:
        path = os.path.abspath(os.path.expanduser(proposal["value"]))
        problem = _vsock_mux_dir_problem(path)
        if problem is not None:
            raise self._invalid("vsock_mux_dir", proposal["value"], problem)
        return path

    @validate("restore_timeout")
    def _validate_restore_timeout(self, proposal: Any) -> float:
        value = proposal["value"]
        # Written so that NaN fails too.
        if not 0.0 < value <= MAX_RESTORE_TIMEOUT_S:
            raise self._invalid("restore_timeout", value)
        return value

    @validate("name")
    def _validate_name(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None and not _NAME_RE.fullmatch(value):
            raise self._invalid("name", value)
        return value

    @validate("volumes", "mounts")
    def _validate_devices(self, proposal: Any) -> list:
        """Cross-field checks, run whenever volumes or mounts change."""
        field = proposal["trait"].name
        value = proposal["value"]
        volumes = value if field == "volumes" else self.volumes
        mounts = value if field == "mounts" else self.mounts
        if len(volumes) > MAX_VOLUMES:
            raise self._invalid("volumes", volumes, f" ({len(volumes)} volumes)")

        def first_duplicate(labelled: list[tuple[str, str]]) -> tuple[str, str, str] | None:
            seen: dict[str, str] = {}
            for label, key in labelled:
                if key in seen:
                    return key, seen[key], label
                seen[key] = label
            return None

        guest_paths = [(f"volumes[{i}]", v.guest_path) for i, v in enumerate(volumes)]
        guest_paths += [(f"mounts[{i}]", m.guest_path) for i, m in enumerate(mounts)]
        checks = [
            (guest_paths, "guest path", "guest paths must be unique across volumes and mounts"),
            (
                [(f"mounts[{i}]", m.tag) for i, m in enumerate(mounts)],
                "tag",
                "mount tags must be unique",
            ),
            (
                # Two disks backed by one file would corrupt each other's ext4.
                [(f"volumes[{i}]", v.host_path) for i, v in enumerate(volumes)],
                "host file",
                "each volume needs its own host file",
            ),
        ]
        for labelled, what, rule in checks:
            duplicate = first_duplicate(labelled)
            if duplicate is not None:
                key, first, second = duplicate
                raise TraitError(
                    f"{type(self).__name__}.{field}: {what} {key!r} is used by both {first} "
                    f"and {second}; {rule}"
                )
        return value

    # -- field listing -------------------------------------------------------------------------

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return FIELDS

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}`` for every field, in order."""
        traits = cls.class_traits()
        return {name: traits[name].help for name in FIELDS}

    # -- builder -------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> VmConfig:
        """A new config with ``changes`` applied; this one is left unchanged."""
        unknown = [key for key in changes if key not in FIELDS]
        if unknown:
            raise TypeError(
                f"replace() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the fields are: {', '.join(FIELDS)}"
            )
        new = type(self)(**{name: getattr(self, name) for name in FIELDS if name not in changes})
        new._assign(changes)
        return new

    def with_memory_mib(self, memory_mib: int | None) -> VmConfig:
        """A new config with ``memory_mib`` guest RAM (None = the image's default)."""
        return self.replace(memory_mib=memory_mib)

    def with_vcpus(self, vcpus: int | None) -> VmConfig:
        """A new config with ``vcpus`` virtual CPUs (None = the image's default)."""
        return self.replace(vcpus=vcpus)

    def with_balloon(self, enabled: bool = True) -> VmConfig:
        """A new config with the virtio-balloon device on (or off)."""
        return self.replace(balloon=enabled)

    def with_volume(
        self,
        host_path: str | os.PathLike | VolumeSpec,
        guest_path: str | None = None,
        size_mib: int | None = None,
        read_only: bool = False,
    ) -> VmConfig:
        """A new config with one more data volume: a VolumeSpec, or the fields of one."""
        if isinstance(host_path, VolumeSpec):
            if (guest_path, size_mib, read_only) != (None, None, False):
                raise TypeError("with_volume() takes a VolumeSpec or its fields, not both")
            spec = host_path
        else:
            spec = VolumeSpec(host_path, guest_path, size_mib, read_only)  # type: ignore[arg-type]
        return self.replace(volumes=[*self.volumes, spec])

    def with_virtiofs(
        self,
        host_path: str | os.PathLike | MountSpec,
        tag: str | None = None,
        guest_path: str | None = None,
        read_only: bool = False,
    ) -> VmConfig:
        """A new config with one more virtio-fs mount: a MountSpec, or the fields of one."""
        if isinstance(host_path, MountSpec):
            if (tag, guest_path, read_only) != (None, None, False):
                raise TypeError("with_virtiofs() takes a MountSpec or its fields, not both")
            spec = host_path
        else:
            spec = MountSpec(host_path, tag, guest_path, read_only)  # type: ignore[arg-type]
        return self.replace(mounts=[*self.mounts, spec])

    def with_assets(
        self,
        kernel: str | os.PathLike | AssetPaths | None,
        initrd: str | os.PathLike | None = None,
    ) -> VmConfig:
        """A new config booting this kernel and initramfs (an AssetPaths, or the two paths).

        ``with_assets(None)`` goes back to automatic discovery.
        """
        if kernel is None and initrd is None:
            assets = None
        elif isinstance(kernel, AssetPaths):
            if initrd is not None:
                raise TypeError("with_assets() takes an AssetPaths or two paths, not both")
            assets = kernel
        else:
            assets = AssetPaths(kernel, initrd)  # type: ignore[arg-type]
        return self.replace(assets=assets)

    def with_vsock_mux_dir(self, path: str | os.PathLike) -> VmConfig:
        """A new config putting the vsock-mux socket in directory ``path``."""
        return self.replace(vsock_mux_dir=path)

    def with_restore_timeout(self, seconds: float) -> VmConfig:
        """A new config with this snapshot restore timeout in seconds."""
        return self.replace(restore_timeout=seconds)

    def with_engine(self, engine: str) -> VmConfig:
        """A new config run by ``engine``: 'auto', 'native' or 'qemu'."""
        return self.replace(engine=engine)

    def with_name(self, name: str | None) -> VmConfig:
        """A new config for a VM called ``name`` (None = unnamed)."""
        return self.replace(name=name)

    # -- value semantics -----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VmConfig):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in FIELDS)

    # Mutable (widgets edit it in place), so not hashable.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        # Only what differs from the defaults, plus the engine, so the repr stays readable.
        shown = [
            f"{name}={getattr(self, name)!r}"
            for name in FIELDS
            if name == "engine" or getattr(self, name) != self.trait_defaults(name)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-serialisable dict (specs become dicts); see :meth:`from_dict`."""
        data: dict[str, Any] = {name: getattr(self, name) for name in FIELDS}
        data["volumes"] = [volume.to_dict() for volume in self.volumes]
        data["mounts"] = [mount.to_dict() for mount in self.mounts]
        data["assets"] = self.assets.to_dict() if self.assets is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> VmConfig:
        """Build from a dict like :meth:`to_dict` makes, validating everything.

        Missing fields take their defaults; unknown keys raise TraitError.
        """
        if not isinstance(data, Mapping):
            raise TraitError(f"{cls.__name__}.from_dict needs a dict of fields, got {data!r}")
        unknown = [key for key in data if key not in FIELDS]
        if unknown:
            raise TraitError(
                f"{cls.__name__}.from_dict: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"the fields are: {', '.join(FIELDS)}"
            )
        values = dict(data)
        for field, spec_type in (("volumes", VolumeSpec), ("mounts", MountSpec)):
            if field in values:
                items = values[field]
                if not isinstance(items, (list, tuple)):
                    allowed = f"a list of {spec_type.__name__} dicts"
                    raise _invalid(cls.__name__, field, allowed, items)
                values[field] = [spec_type.from_dict(item) for item in items]
        if values.get("assets") is not None:
            values["assets"] = AssetPaths.from_dict(values["assets"])
        return cls(**values)

    def to_json(self, indent: int | None = None) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> VmConfig:
        """Build from JSON text made by :meth:`to_json`, validating everything."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise TraitError(f"{cls.__name__}.from_json: not valid JSON ({exc})") from exc
        except RecursionError:
            raise TraitError(f"{cls.__name__}.from_json: JSON nested too deeply to be a "
                             "VmConfig") from None
        return cls.from_dict(data)


def _fields_section() -> str:
    """The "Fields" part of VmConfig's docstring, generated from the traits' help text so
    ``help(VmConfig)`` and the help strings cannot drift apart."""
    lines = ["", "    Fields", "    ------"]
    for name, text in VmConfig.field_help().items():
        lines.append(f"    {name}")
        lines.append(textwrap.indent(textwrap.fill(text, width=84), " " * 8))
    return "\n".join(lines) + "\n"


VmConfig.__doc__ = (VmConfig.__doc__ or "") + _fields_section()
