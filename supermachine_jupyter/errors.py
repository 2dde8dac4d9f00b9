"""The project's own error types.

Invalid configuration values raise ``traitlets.TraitError`` (see ``config.py``); everything
that goes wrong while a VM runs raises a subclass of :class:`VmError`.
"""


class VmError(RuntimeError):
    """Base class for errors raised while starting, running or stopping a VM."""


class AssetError(VmError):
    """The guest kernel or initramfs is missing or could not be built."""


class EngineError(VmError):
    """The engine (QEMU or the native core) failed or died."""


class AgentError(VmError):
    """The guest agent sent an error, broke the protocol, or went away."""


class ProtocolVersionError(AgentError):
    """Host and guest agent speak different protocol versions."""


class VmStoppedError(VmError):
    """An operation was attempted on a VM that is no longer running."""


class SnapshotError(VmError):
    """A snapshot could not be written, read or restored; the message says why."""


class SnapshotVersionError(SnapshotError):
    """The snapshot comes from another format version or another QEMU version."""


class SnapshotTimeoutError(SnapshotError):
    """A restore took longer than ``VmConfig.restore_timeout``."""


class SnapshotNotSupportedError(SnapshotError, NotImplementedError):
    """The engine cannot snapshot or restore."""


class ImageError(VmError):
    """An OCI image could not be pulled, converted or booted (its root file system is
    missing or damaged); the message names the image and what to do."""
