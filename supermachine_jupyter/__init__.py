"""supermachine_jupyter: run notebook cells inside hardware-isolated Linux microVMs.

In a notebook::

    %load_ext supermachine_jupyter
    %%vm --memory 512 --name lab1
    uname -a

From Python::

    from . import Image, VmConfig
    with Image.default().start(VmConfig(memory_mib=512)) as vm:
        print(vm.run("uname -a").stdout)
"""

__version__ = "0.1.0"

from .config import AssetPaths, MountSpec, VmConfig, VolumeSpec
from .errors import (
    AgentError,
    AssetError,
    EngineError,
    ProtocolVersionError,
    SnapshotError,
    SnapshotNotSupportedError,
    SnapshotTimeoutError,
    SnapshotVersionError,
    VmError,
    VmStoppedError,
)


def __getattr__(name: str):
    # Image/Vm pull in the engines; import them on first use to keep `import` light.
    if name == "Image":
        from .image import Image
        return Image
    if name in ("Vm", "ExecResult"):
        from . import vm
        return getattr(vm, name)
    raise AttributeError(name)


def load_ipython_extension(ipython) -> None:
    """``%load_ext supermachine_jupyter``: registers ``%%vm`` and ``%vm``."""
    from .jupyter.magics import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .jupyter.magics import unload_ipython_extension as unload
    unload(ipython)


def _jupyter_server_extension_points() -> list[dict]:
    """The jupyter_server extension (REST API over the VM registry), enabled on install."""
    return [{"module": "supermachine_jupyter.jupyter.server"}]


def _jupyter_labextension_paths() -> list[dict]:
    """The prebuilt JupyterLab extension (the "MicroVMs" sidebar)."""
    return [{"src": "labextension", "dest": "supermachine-jupyter"}]


__all__ = [
    "AgentError",
    "AssetError",
    "AssetPaths",
    "EngineError",
    "ExecResult",
    "Image",
    "MountSpec",
    "ProtocolVersionError",
    "SnapshotError",
    "SnapshotNotSupportedError",
    "SnapshotTimeoutError",
    "SnapshotVersionError",
    "Vm",
    "VmConfig",
    "VmError",
    "VmStoppedError",
    "VolumeSpec",
    "load_ipython_extension",
]
