"""The one path by which every VM comes into being, booted or restored::

    (what to start, VmConfig) → run directory → engine boot | engine restore
        → agent handshake → guest refresh (restores) → Vm

:func:`launch` is that path; ``Image.start`` (boot) and ``snapshot.restore`` (restore) only
say what differs: how the :class:`LaunchSpec` is made, how the engine starts, how a failure
reads. Whatever fails on the way, the engine is ended and the run directory removed here,
once, and an interrupt (KeyboardInterrupt) while booting never leaves an engine behind.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .agent import AgentClient
from .errors import AgentError, EngineError
from .vm import Vm

if TYPE_CHECKING:
    from .config import VmConfig
    from .engines.base import EngineInstance, LaunchSpec

#: The failures of a launch that say something about the guest or the engine (anything else,
#: KeyboardInterrupt included, is raised as it is).
LAUNCH_FAILURES = (AgentError, EngineError, TimeoutError, OSError)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What differs between a boot and a restore; :func:`launch` does the rest.

    - ``spec(run_dir)``: the VM's LaunchSpec, given its fresh private run directory;
    - ``start(spec, mark)``: the engine instance, running (a restore loads, checks and
      resumes it here);
    - ``failed(exc, instance, spec)``: the error a caller sees for a failure of the
      ``LAUNCH_FAILURES`` kinds (``instance`` is None when the engine never started);
    - ``refresh(agent, seconds_left)``: what the guest needs once its agent answers;
    - ``timeout_s``: the whole launch, from the start to the last refresh;
    - ``restored_from``, ``balloon_target_mib``: what the new Vm starts out with.
    """
    spec: Callable[[Path], "LaunchSpec"]
    start: Callable[["LaunchSpec", Callable[[str], None]], "EngineInstance"]
    failed: Callable[[BaseException, "EngineInstance | None", "LaunchSpec | None"], Exception]
    timeout_s: float
    refresh: Callable[[AgentClient, float], None] | None = None
    restored_from: Path | None = None
    balloon_target_mib: int = 0


def vm_name(name: str | None, config: "VmConfig") -> str:
    """The new VM's name: the caller's, the config's, or a fresh ``vm-xxxxxx``."""
    return name or config.name or f"vm-{secrets.token_hex(3)}"


def launch(name: str, config: "VmConfig", how: Launch) -> Vm:
    """Bring a VM up as ``how`` says and return it once its agent has answered."""
    started = time.monotonic()
    deadline = started + how.timeout_s
    marks: dict[str, float] = {}

    def mark(stage: str) -> None:
        marks[stage] = round(time.monotonic() - started, 4)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{how.timeout_s:g} s passed")
        return remaining

    run_dir = Path(tempfile.mkdtemp(prefix=f"sm-{name[:16]}-", dir=config.vsock_mux_dir))
    spec = instance = agent = None
    try:
        spec = how.spec(run_dir)
        instance = how.start(spec, mark)
        agent = AgentClient(instance.connect_agent(timeout=left()), name=name)
        agent.handshake(timeout=left())
        mark("agent_hello")
        if how.refresh is not None:
            how.refresh(agent, left())
            mark("guest_refreshed")
    except BaseException as exc:
        if agent is not None:
            agent.close()
        if instance is not None:
            instance.shutdown(None, timeout=3)
        shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, LAUNCH_FAILURES):
            raise how.failed(exc, instance, spec) from exc
        raise
    return Vm(spec, instance, agent, time.monotonic() - started,
              restored_from=how.restored_from, restore_timings=marks,
              balloon_target_mib=how.balloon_target_mib)
