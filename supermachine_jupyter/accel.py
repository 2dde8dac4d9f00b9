"""Deprecated path: the accelerator check lives in :mod:`supermachine_jupyter.engines.accel`."""

from ._moved import forwarder

__getattr__ = forwarder(__name__, "supermachine_jupyter.engines.accel")
