"""Deprecated path: snapshots live in :mod:`supermachine_jupyter.snapshots` (their errors are
also at the package's top level)."""

from ._moved import forwarder

__getattr__ = forwarder(__name__, "supermachine_jupyter.snapshots",
                        "supermachine_jupyter.snapshots.cache")
