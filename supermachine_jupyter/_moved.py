"""Old module paths of the public API, kept working after the package was laid out in layers.

``supermachine_jupyter.snapshot`` became the ``snapshots`` package and
``supermachine_jupyter.accel`` became ``engines.accel``; notebooks written against the old
paths keep running, with a ``DeprecationWarning`` that names the new one.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def forwarder(old: str, *new: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for the old module ``old``: each name is looked up in the
    modules ``new`` in order."""

    def __getattr__(name: str) -> object:
        if name.startswith("__"):   # the import system's own probes (__path__, ...)
            raise AttributeError(name)
        for module_name in new:
            module = importlib.import_module(module_name)
            if hasattr(module, name):
                warnings.warn(f"{old}.{name} moved to {module_name}.{name}",
                              DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
