"""``Vm``: one running microVM, the same API whatever engine runs it.

A ``Vm`` owns an engine instance (QEMU process or native core) and an :class:`AgentClient`
connected to the guest's agent. It is thread-safe: several threads may ``run``/``exec`` at
once (the agent multiplexes them), and ``stop`` may be called from any thread, any number of
times.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import signal as _signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Iterator

from .agent import AgentClient, ExecProcess, Exit, Output
from .balloon import BalloonNotEnabled, BalloonStats
from .mounts import MountStatus
from .console import ConsoleBuffer
from .errors import AgentError, EngineError, VmError, VmStoppedError

if TYPE_CHECKING:
    from .config import VmConfig
    from .engines.base import EngineInstance, LaunchSpec

#: How an interrupted command is stopped: (signal, seconds to wait for it to end).
INTERRUPT_ESCALATION = ((_signal.SIGINT, 1.0), (_signal.SIGTERM, 1.0), (_signal.SIGKILL, 0.8))


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What ``Vm.run`` returns. ``exit_code`` is None when a signal ended the command."""
    stdout: str
    stderr: str
    exit_code: int | None
    duration: float
    timed_out: bool = False
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __repr__(self) -> str:
        status = (f"signal={self.signal}" if self.signal else f"exit_code={self.exit_code}")
        extra = ", timed_out=True" if self.timed_out else ""
        return (f"ExecResult({status}, duration={self.duration:.3f}s{extra}, "
                f"stdout={_clip(self.stdout)!r}, stderr={_clip(self.stderr)!r})")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def stop_command(proc: ExecProcess, escalation=INTERRUPT_ESCALATION) -> Exit | None:
    """SIGINT, then SIGTERM, then SIGKILL to a guest command, as IPython's ``%%script`` does."""
    for signo, wait_s in escalation:
        proc.signal(signo)
        try:
            return proc.wait(timeout=wait_s)
        except TimeoutError:
            continue
        except AgentError:
            return None
    return None


#: Console lines of a guest that stopped its CPUs for good, and what we report.
GUEST_HALT_LINES = {
    "reboot: Power down": "the guest powered off",
    "reboot: System halted": "the guest halted",
}

_live_vms: "weakref.WeakSet[Vm]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for vm in list(_live_vms):
        try:
            vm.stop(timeout=3)
        except Exception:  # noqa: BLE001 - best effort while the interpreter exits
            pass


class Vm:
    """A running microVM. Create with ``Image.start(config)``; use as a context manager."""

    def __init__(self, spec: "LaunchSpec", instance: "EngineInstance", agent: AgentClient,
                 boot_seconds: float, on_stop: Callable[["Vm"], None] | None = None):
        self._spec = spec
        self._instance = instance
        self._agent = agent
        self._lock = threading.RLock()
        self._state = "running"
        self._failure: str | None = None
        self._on_stop = [on_stop] if on_stop else []
        self._balloon_target_mib = 0
        self.boot_seconds = boot_seconds
        self.started_at = time.time()
        _live_vms.add(self)
        # Without ACPI a guest that powers off or halts only stops its CPUs: the engine would
        # idle forever. The kernel says so on the console; we end the VM when it does.
        self._console_tail = ""
        self._halted: str | None = None
        self._unsubscribe_console = spec.console.subscribe(self._watch_console)
        agent.describe_loss = self._describe_end
        self._watcher = threading.Thread(target=self._watch, name=f"vm-watch-{spec.name}",
                                         daemon=True)
        self._watcher.start()
        from . import registry
        registry.publish(self)      # list it for the Jupyter server's sidebar (never raises)

    # -- identity and state ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def config(self) -> "VmConfig":
        return self._spec.config

    @property
    def engine(self) -> str:
        """``"qemu"`` or ``"native"``."""
        return self._instance.engine_name

    @property
    def accel(self) -> str:
        return self._instance.accel

    @property
    def engine_reason(self) -> str:
        """Why this engine and accelerator run the VM."""
        return self._instance.reason

    @property
    def memory_mib(self) -> int:
        return self._spec.memory_mib

    @property
    def vcpus(self) -> int:
        return self._spec.vcpus

    @property
    def state(self) -> str:
        """``running``, ``stopping``, ``stopped`` or ``failed``."""
        if self._state == "running":
            self._notice_end()
        return self._state

    @property
    def failure(self) -> str | None:
        """Why the VM ended on its own, if it did."""
        return self._failure

    @property
    def instance(self) -> "EngineInstance":
        return self._instance

    @property
    def agent(self) -> AgentClient:
        return self._agent

    def __repr__(self) -> str:
        extra = f" failure={self._failure!r}" if self._failure else ""
        return (f"<Vm {self.name!r} engine={self.engine}/{self.accel} state={self._state} "
                f"memory={self.memory_mib}MiB vcpus={self.vcpus} ({self.engine_reason}){extra}>")

    def _repr_html_(self) -> str:
        from html import escape
        colour = {"running": "#2e7d32", "failed": "#c62828"}.get(self._state, "#616161")
        return (f"<b>{escape(self.name)}</b> <span style='color:{colour}'>{self._state}</span>"
                f" · {escape(self.engine)}/{escape(self.accel)} · {self.memory_mib} MiB · "
                f"{self.vcpus} vCPU<br><small>{escape(self.engine_reason)}</small>")

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _describe_end(self) -> str | None:
        """Why the VM ended: a halt seen on the console, else the engine's exit."""
        if self._halted:
            return self._halted
        end = self._instance.settled_exit_description()
        return self._halted or end

    def _watch_console(self, text: str) -> None:
        self._console_tail = (self._console_tail + text)[-256:]
        for line, why in GUEST_HALT_LINES.items():
            if line in self._console_tail and self._halted is None:
                self._halted = why

    def _watch(self) -> None:
        # Notice an engine that dies on its own (guest crash, killed QEMU) and say why.
        while self._state == "running" and not self._notice_end():
            time.sleep(0.2)

    def _notice_end(self) -> bool:
        """If the VM ended on its own (engine gone, guest halted), record why, reap what the
        engine leaves behind and clean up. True when the VM is no longer running. Called by
        the watcher thread and by ``state``, so a caller never sees "running" for a VM whose
        engine is already gone."""
        if self._instance.is_running() and not self._halted:
            return False
        with self._lock:
            if self._state != "running":
                return True
            self._state = "failed"
            self._failure = self._halted or self._instance.exit_description() or "engine ended"
        self._agent.close("the VM ended: " + self._failure)
        # Ends a halted guest's engine; reaps a dead one's helpers (virtiofsd): no zombies.
        self._instance.shutdown(None, timeout=3)
        self._cleanup()
        return True

    def _check_running(self) -> None:
        if self.state != "running":
            why = f": {self._failure}" if self._failure else ""
            raise VmStoppedError(f"VM {self.name!r} is {self._state}{why}")

    def _explain(self, exc: AgentError) -> VmError:
        """Turn a lost agent connection into an error that says what happened to the VM."""
        desc = self._describe_end()
        if desc:
            return VmStoppedError(f"VM {self.name!r} ended while running the command: {desc}")
        return exc

    # -- commands ----------------------------------------------------------------------
    def exec(self, script: str | None = None, *, argv: list[str] | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: bool | bytes = False) -> ExecProcess:
        """Start a command and return it while it runs: iterate it for ``Output`` events and
        the final ``Exit``, or call ``.wait(on_stdout=..., on_stderr=...)``."""
        self._check_running()
        if script is None and argv is None:
            raise ValueError("exec needs a script or argv")
        try:
            return self._agent.exec(argv, script=script, env=env, cwd=cwd, stdin=stdin)
        except AgentError as exc:
            raise self._explain(exc) from exc

    def stream(self, script: str, **kwargs) -> Iterator[Output | Exit]:
        """Iterate over a command's output events (a generator over ``exec``)."""
        proc = self.exec(script, **kwargs)
        try:
            yield from proc
        except AgentError as exc:
            raise self._explain(exc) from exc
        finally:
            if proc.exit is None:
                stop_command(proc)

    def run(self, script: str, timeout: float | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: bytes | None = None,
            on_stdout: Callable[[bytes], object] | None = None,
            on_stderr: Callable[[bytes], object] | None = None) -> ExecResult:
        """Run a shell script in the guest and wait for it.

        On ``timeout`` (seconds) the command's process group is killed and the result has
        ``timed_out=True``; the VM stays usable. Callbacks see output as it arrives.
        """
        out, err = bytearray(), bytearray()

        def take_out(data: bytes) -> None:
            out.extend(data)
            if on_stdout:
                on_stdout(data)

        def take_err(data: bytes) -> None:
            err.extend(data)
            if on_stderr:
                on_stderr(data)

        started = time.monotonic()
        proc = self.exec(script, env=env, cwd=cwd, stdin=stdin if stdin is not None else False)
        timed_out = False
        try:
            try:
                status = proc.wait(timeout=timeout, on_stdout=take_out, on_stderr=take_err)
            except TimeoutError:
                timed_out = True
                proc.kill()
                status = proc.wait(timeout=10, on_stdout=take_out, on_stderr=take_err)
            except BaseException:
                if proc.exit is None:
                    stop_command(proc)
                raise
        except AgentError as exc:
            raise self._explain(exc) from exc
        return ExecResult(out.decode(errors="replace"), err.decode(errors="replace"),
                          status.code, time.monotonic() - started, timed_out, status.signal)

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the guest agent, in seconds."""
        self._check_running()
        return self._agent.ping(timeout=timeout)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> int:
        self._check_running()
        return self._agent.write_file(path, data.encode() if isinstance(data, str) else data, mode)

    def read_file(self, path: str) -> bytes:
        self._check_running()
        return self._agent.read_file(path)

    # -- devices -----------------------------------------------------------------------
    def _balloon_instance(self) -> "EngineInstance":
        self._check_running()
        if not self.config.balloon:
            raise BalloonNotEnabled(self.name)
        return self._instance

    def set_balloon_target(self, balloon_mib: int) -> None:
        """Set the balloon's size in MiB: memory taken away from the guest (0: none)."""
        if not isinstance(balloon_mib, int) or isinstance(balloon_mib, bool) \
                or not 0 <= balloon_mib < self.memory_mib:
            raise ValueError(f"balloon size must be an integer from 0 to {self.memory_mib - 1} "
                             f"MiB (the VM has {self.memory_mib} MiB), got {balloon_mib!r}")
        instance = self._balloon_instance()
        with self._lock:
            self._balloon_target_mib = balloon_mib
            instance.balloon_set_target_mib(balloon_mib)

    def request_balloon_inflate(self, mib: int) -> int:
        """Grow the balloon by ``mib`` MiB (the guest gives that memory back to the host).
        Returns the new target size in MiB."""
        target = min(self._balloon_target_mib + int(mib), self.memory_mib - 1)
        self.set_balloon_target(target)
        return target

    def request_balloon_deflate(self, mib: int) -> int:
        """Shrink the balloon by ``mib`` MiB (the guest gets memory back)."""
        target = max(self._balloon_target_mib - int(mib), 0)
        self.set_balloon_target(target)
        return target

    def balloon_stats(self) -> BalloonStats:
        """Balloon size (target/actual) and the guest's memory statistics."""
        return self._balloon_instance().balloon_stats()

    def mounts(self) -> list[MountStatus]:
        """The VM's virtio-fs mounts with their counters."""
        return self._instance.mount_status()

    def volumes(self) -> list[dict]:
        """The VM's volumes: paths, serial, read-only, size and host blocks used."""
        from .volumes import usage
        return [{"host_path": str(v.path), "guest_path": v.spec.guest_path,
                 "serial": v.serial, "read_only": v.spec.read_only, **usage(v.path)}
                for v in self._spec.volumes]

    # -- snapshots ---------------------------------------------------------------------
    #: The snapshot directory this VM was restored from (None: it booted).
    restored_from = None

    def snapshot(self, path, *, overwrite: bool = False):
        """Save this VM (guest memory, vCPUs, irqchip, devices, volume contents) as a
        snapshot directory at ``path``; the guest pauses briefly and keeps running.

        Returns a :class:`~supermachine_jupyter.snapshot.Snapshot`;
        ``Image.from_snapshot(path).start()`` starts new VMs from it on the same engine
        (QEMU or the native core). VMs with virtio-fs mounts cannot be snapshotted (see
        ``snapshot.py``)."""
        self._check_running()
        from .snapshot import write_snapshot
        return write_snapshot(self, path, overwrite=overwrite)

    # -- console -----------------------------------------------------------------------
    @property
    def console(self) -> ConsoleBuffer:
        """The live console buffer (``subscribe`` to follow it)."""
        return self._spec.console

    def console_output(self) -> str:
        """Everything the guest printed on its serial console (last 1 MiB)."""
        return self._spec.console.text()

    # -- lifecycle ---------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Power the guest off, escalating to killing the engine; safe to call repeatedly."""
        with self._lock:
            if self._state in ("stopped", "failed"):
                self._cleanup()
                return
            self._state = "stopping"
        try:
            self._instance.shutdown(self._agent, timeout)
        finally:
            self._agent.close()
            with self._lock:
                self._state = "stopped"
            self._cleanup()

    def _cleanup(self) -> None:
        with self._lock:
            callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
        self._unsubscribe_console()
        from . import registry
        registry.withdraw(self)
        shutil.rmtree(self._spec.run_dir, ignore_errors=True)
        _live_vms.discard(self)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state in ("running", "stopping"):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


__all__ = ["Vm", "ExecResult", "stop_command", "EngineError"]
