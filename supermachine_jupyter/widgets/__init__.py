"""Notebook widgets for microVMs (ipywidgets only: no JavaScript build).

- :class:`VmConfigForm` edits a :class:`~supermachine_jupyter.config.VmConfig`, two-way linked.
- :class:`ConsoleView` follows a VM's serial console.
- :class:`BalloonPanel` charts the balloon and the guest's memory and inflates/deflates it.
- :class:`MountPanel` lists volumes and virtio-fs mounts with their counters.
- :class:`VmDashboard` puts them together with start/stop buttons and the VM's state.

Live panels refresh from a daemon thread each (see :mod:`.sampler`), so cells keep running
while they update; each thread ends when its VM stops or the widget is closed.
"""

from .balloon_panel import BalloonPanel
from .config_form import VmConfigForm
from .console_view import ConsoleView
from .dashboard import VmDashboard
from .mount_panel import MountPanel

__all__ = ["BalloonPanel", "ConsoleView", "MountPanel", "VmConfigForm", "VmDashboard"]
