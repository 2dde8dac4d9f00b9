"""``Vm``: one running microVM, the same API whatever engine runs it.

A ``Vm`` owns an engine instance (QEMU process or native core) and an :class:`AgentClient`
connected to the guest's agent. It is thread-safe: several threads may ``run``/``exec`` at
once (the agent multiplexes them), and ``stop`` may be called from any thread, any number of
times.
"""

from __future__ import annotations

import atexit
import dataclasses
import shlex
import shutil
import signal as _signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Iterator

from .devices.balloon import BalloonNotEnabled, BalloonStats
from .devices.mounts import MountStatus
from .errors import AgentError, EngineError, VmError, VmStoppedError
from .guest.agent import (
    DEFAULT_READ_LIMIT_BYTES,
    AgentClient,
    ExecProcess,
    Exit,
    Output,
)
from .guest.console import ConsoleBuffer

if TYPE_CHECKING:
    from pathlib import Path

    from .config import VmConfig
    from .engines.base import EngineInstance, LaunchSpec
    from .guest.rootfs import ImageRootfs

#: How an interrupted command is stopped: (signal, seconds to wait for it to end).
INTERRUPT_ESCALATION = ((_signal.SIGINT, 1.0), (_signal.SIGTERM, 1.0), (_signal.SIGKILL, 0.8))
#: After the kill on a timeout, how long the command's exit is awaited before it is given up.
KILL_GRACE_SECONDS = 2.0
#: ``run``'s default cap on the output kept in its result, per stream (callbacks see it all).
DEFAULT_OUTPUT_LIMIT_BYTES = 16 * 1024 * 1024
# Waits are cut into slices this long so that KeyboardInterrupt is seen promptly.
_WAIT_SLICE_SECONDS = 0.25


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What ``Vm.run`` returns. ``exit_code`` is None when a signal ended the command, or
    when it was given up (``timed_out`` with neither code nor signal: its exit never came).
    ``stdout_truncated``/``stderr_truncated``: the stream had more than the kept bytes.
    ``interrupted``: Ctrl-C stopped it (``run(raise_interrupt=False)``)."""
    stdout: str
    stderr: str
    exit_code: int | None
    duration: float
    timed_out: bool = False
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def truncated(self) -> bool:
        """True when some output was not kept (beyond ``max_output_bytes``)."""
        return self.stdout_truncated or self.stderr_truncated

    def describe(self) -> str:
        """How the command ended, in words: ``exit 3``, ``killed by SIGKILL``, …"""
        if self.signal:
            return Exit(None, self.signal).describe()
        if self.exit_code is not None:
            return f"exit {self.exit_code}"
        return "no exit status (the command was given up after the kill)"

    def __repr__(self) -> str:
        status = (f"signal={self.signal}" if self.signal else f"exit_code={self.exit_code}")
        extra = "".join(f", {flag}=True" for flag in ("timed_out", "interrupted",
                                                      "stdout_truncated", "stderr_truncated")
                        if getattr(self, flag))
        return (f"ExecResult({status}, duration={self.duration:.3f}s{extra}, "
                f"stdout={_clip(self.stdout)!r}, stderr={_clip(self.stderr)!r})")


#: The environment of a program the user runs and watches (a %%vm cell, ``run`` on the
#: command line): output streams as it is printed, and Python (a python3 cell, or one a shell
#: script starts) buffers a pipe's output unless told not to.
STREAMING_ENV = {"PYTHONUNBUFFERED": "1"}


def program_command(program: str, interpreter: list[str] | None = None) -> dict:
    """``Vm.run`` arguments for a program the user wrote (a ``%%vm`` cell, ``run``'s script):
    ``/bin/sh -c`` it, or the interpreter's argv with the program on its stdin (as IPython's
    ``%%script`` does); with ``STREAMING_ENV``."""
    if not interpreter:
        return {"script": program, "env": dict(STREAMING_ENV)}
    return {"argv": list(interpreter), "stdin": program.encode(), "env": dict(STREAMING_ENV)}


def _shell_quote(text: str) -> str:
    return shlex.quote(text)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def stop_command(proc: ExecProcess, escalation=INTERRUPT_ESCALATION,
                 on_stdout: Callable[[bytes], object] | None = None,
                 on_stderr: Callable[[bytes], object] | None = None) -> Exit | None:
    """SIGINT, then SIGTERM, then SIGKILL to a guest command, as IPython's ``%%script`` does,
    each given its time to end it. A command whose exit still does not come is given up
    (the agent forgets it): None."""
    for signo, wait_s in escalation:
        proc.signal(signo)
        try:
            return proc.wait(timeout=wait_s, on_stdout=on_stdout, on_stderr=on_stderr)
        except TimeoutError:
            continue
        except AgentError:
            return None
    proc.abandon("the command did not end after SIGINT, SIGTERM and SIGKILL")
    return None


class _KeptOutput:
    """One stream's output for an ExecResult: every chunk goes to the callback; the first
    ``limit`` bytes are kept."""

    def __init__(self, limit: int, callback: Callable[[bytes], object] | None):
        self.data = bytearray()
        self.limit = max(0, limit)
        self.callback = callback
        self.truncated = False

    def __call__(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]
        if self.callback is not None:
            self.callback(chunk)

    def text(self) -> str:
        return self.data.decode(errors="replace")


def wait_command(proc: ExecProcess, timeout: float | None = None, *,
                 on_stdout: Callable[[bytes], object] | None = None,
                 on_stderr: Callable[[bytes], object] | None = None,
                 max_output_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
                 raise_interrupt: bool = True, escalation=INTERRUPT_ESCALATION,
                 started: float | None = None) -> ExecResult:
    """Wait for a running guest command and return its result: the one implementation of
    deadline, kill on timeout and Ctrl-C behind ``Vm.run``, the ``%%vm`` magic and the CLI.

    * Every byte of output goes to the callbacks as it arrives; the result keeps the first
      ``max_output_bytes`` of each stream and says when there was more.
    * ``timeout`` (seconds, counted from ``started``, a ``time.monotonic()`` value, default
      now): the command's process group is killed; its exit is awaited for
      ``KILL_GRACE_SECONDS`` at most, then the command is given up (children that left its
      group may hold its output open). Either way the result has ``timed_out=True``.
    * ``KeyboardInterrupt``: ``stop_command`` (SIGINT, SIGTERM, SIGKILL as ``escalation``
      says), then the interrupt is raised again; with ``raise_interrupt=False`` the result
      comes back with ``interrupted=True``.
    """
    started = time.monotonic() if started is None else started
    deadline = None if timeout is None else started + timeout
    out = _KeptOutput(max_output_bytes, on_stdout)
    err = _KeptOutput(max_output_bytes, on_stderr)
    status: Exit | None = None
    timed_out = interrupted = False
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                timed_out = True
                proc.kill()
                try:
                    status = proc.wait(timeout=KILL_GRACE_SECONDS, on_stdout=out, on_stderr=err)
                except TimeoutError:
                    proc.abandon(f"no exit {KILL_GRACE_SECONDS} s after the kill on timeout")
                break
            try:
                status = proc.wait(timeout=_WAIT_SLICE_SECONDS if left is None
                                   else min(_WAIT_SLICE_SECONDS, left),
                                   on_stdout=out, on_stderr=err)
                break
            except TimeoutError:
                continue
    except KeyboardInterrupt:
        interrupted = True
        status = stop_command(proc, escalation, on_stdout=out, on_stderr=err)
        if raise_interrupt:
            raise
    except BaseException:
        # A callback failed (or the agent went away): never leave the command running.
        if proc.exit is None and not proc.abandoned:
            stop_command(proc, escalation)
        raise
    return ExecResult(out.text(), err.text(), status.code if status else None,
                      time.monotonic() - started, timed_out, status.signal if status else None,
                      out.truncated, err.truncated, interrupted)


#: Console lines of a guest that stopped its CPUs for good, and what we report.
GUEST_HALT_LINES = {
    "reboot: Power down": "the guest powered off",
    "reboot: System halted": "the guest halted",
}
#: Console lines of a guest on its way out (the engine then exits by itself: ``-no-reboot``,
#: ``panic=-1``), and what we report once it has.
GUEST_END_LINES = {
    "reboot: Restarting system": "the guest rebooted",
}
KERNEL_PANIC_MARK = "Kernel panic - not syncing: "
# Console text kept while waiting for the end of a line.
_CONSOLE_LINE_MAX = 4096
# The last console lines may reach us a moment after the engine has exited.
_CONSOLE_SETTLE_SECONDS = 0.3

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
                 boot_seconds: float, on_stop: Callable[["Vm"], None] | None = None, *,
                 restored_from: "Path | None" = None,
                 restore_timings: dict[str, float] | None = None,
                 balloon_target_mib: int = 0):
        """Made by ``launch.launch`` once the guest's agent has answered (``Image.start``,
        ``Image.from_snapshot(p).start``): not called directly."""
        self._spec = spec
        self._instance = instance
        self._agent = agent
        self._lock = threading.RLock()
        self._state = "running"
        self._failure: str | None = None
        self._on_stop = [on_stop] if on_stop else []
        self._balloon_target_mib = balloon_target_mib
        #: the snapshot directory this VM was restored from (None: it booted)
        self.restored_from = restored_from
        #: seconds from the start of the launch to each stage (agent_hello, …)
        self.restore_timings = restore_timings or {}
        self.boot_seconds = boot_seconds
        self.started_at = time.time()
        _live_vms.add(self)
        # Without ACPI a guest that powers off or halts only stops its CPUs: the engine would
        # idle forever. The kernel says so on the console; we end the VM when it does.
        self._console_partial = ""
        self._halted: str | None = None
        # What the console said last about a guest on its way out (panic, reboot): the VM's
        # failure once its engine has exited.
        self._guest_end: str | None = None
        self._ender: threading.Thread | None = None
        # Set once a stopped or failed VM's engine is shut down and its files cleaned up.
        self._ended = threading.Event()
        self._unsubscribe_console = spec.console.subscribe(self._watch_console)
        agent.describe_loss = self._describe_end
        agent.on_connection_lost = self._agent_connection_lost
        # Set by stop(): the watcher stops polling at once (stop() joins it before the engine
        # is shut down, so it never looks at an engine being freed).
        self._stop_watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"vm-watch-{spec.name}",
                                         daemon=True)
        self._watcher.start()

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
    def image(self) -> "ImageRootfs | None":
        """The OCI image this VM runs (its ref, digest and config), or None for the default
        busybox guest."""
        return self._spec.rootfs

    @property
    def instance(self) -> "EngineInstance":
        return self._instance

    @property
    def agent(self) -> AgentClient:
        return self._agent

    def __repr__(self) -> str:
        extra = f" failure={self._failure!r}" if self._failure else ""
        if self.image is not None:
            from .devices.rootfs import short_digest
            extra = f" image={self.image.ref}@{short_digest(self.image.digest)}" + extra
        if self.restored_from is not None:
            extra = f" restored_from={str(self.restored_from)!r}" + extra
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
        """Why the VM ended: a halt seen on the console; else, once the engine has exited,
        what the console said last (kernel panic, reboot) or the engine's exit. None while
        the VM runs."""
        if self._halted:
            return self._halted
        end = self._instance.settled_exit_description()
        if end is None:
            return None
        return self._halted or self._console_end() or end

    def _console_end(self) -> str | None:
        """The console's word on how the guest ended, once its last lines have arrived."""
        deadline = time.monotonic() + _CONSOLE_SETTLE_SECONDS
        while self._guest_end is None and self._halted is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._halted or self._guest_end

    def _watch_console(self, text: str) -> None:
        *lines, partial = (self._console_partial + text).split("\n")
        self._console_partial = partial[-_CONSOLE_LINE_MAX:]
        for line in lines:
            self._console_line(line)
        self._console_line(self._console_partial, partial=True)

    def _console_line(self, line: str, partial: bool = False) -> None:
        if self._halted is None:
            self._halted = next((why for mark, why in GUEST_HALT_LINES.items() if mark in line),
                                None)
        if partial:
            return   # panic reasons and reboots are read from whole lines
        if KERNEL_PANIC_MARK in line and "---[ end " not in line:
            reason = line.split(KERNEL_PANIC_MARK, 1)[1].strip()[:300]
            self._guest_end = f"the guest kernel panicked: {reason}"
        else:
            for mark, why in GUEST_END_LINES.items():
                if mark in line:
                    self._guest_end = why

    def _watch(self) -> None:
        # Notice an engine that dies on its own (guest crash, killed QEMU) and say why.
        while self._state == "running" and not self._notice_end():
            if self._stop_watching.wait(0.2):
                return

    def _notice_end(self) -> bool:
        """If the VM ended on its own (engine gone, guest halted), record why, reap what the
        engine leaves behind and clean up. True when the VM is no longer running. Called by
        the watcher thread and by ``state``, so a caller never sees "running" for a VM whose
        engine is already gone."""
        if self._instance.is_running() and not self._halted:
            return False
        failure = self._halted or self._console_end() or self._instance.exit_description() \
            or "engine ended"
        with self._lock:
            if self._state != "running":
                return True
            self._state = "failed"
            self._failure = failure
        self._end_engine()
        return True

    def _end_engine(self) -> None:
        """After a failure: close the agent, end the engine, clean up."""
        try:
            self._agent.close("the VM ended: " + (self._failure or ""))
            # Ends a halted guest's engine; reaps a dead one's helpers (virtiofsd): no zombies.
            self._instance.shutdown(None, timeout=3)
            self._cleanup()
        finally:
            self._ended.set()

    def _agent_connection_lost(self, reason: str) -> None:
        """The agent's connection died while the engine runs (the agent broke the protocol,
        or the guest took its channel away): every later call would fail, so the VM is
        failed, saying why, and its engine is ended (in the background: this runs on the
        agent's reader thread)."""
        with self._lock:
            if self._state != "running":
                return
            self._state = "failed"
            self._failure = f"the guest agent connection was lost: {reason}"
            self._ender = threading.Thread(target=self._end_engine, daemon=True,
                                           name=f"vm-end-{self.name}")
        self._ender.start()

    def _check_running(self) -> None:
        if self.state != "running":
            why = f": {self._failure}" if self._failure else ""
            raise VmStoppedError(f"VM {self.name!r} is {self._state}{why}")

    def _explain(self, exc: AgentError) -> VmError:
        """Turn a lost agent connection into an error that says what happened to the VM."""
        if not self._agent.closed:
            return exc      # the agent answered (an ERROR frame, a limit): nothing to add
        desc = self._failure if self._state == "failed" and self._failure else \
            self._describe_end()
        if desc:
            return VmStoppedError(f"VM {self.name!r} ended while running the command: {desc}")
        return exc

    # -- commands ----------------------------------------------------------------------
    def exec(self, script: str | None = None, *, argv: list[str] | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: bool | bytes = False, user: str | None = None) -> ExecProcess:
        """Start a command and return it while it runs: iterate it for ``Output`` events and
        the final ``Exit``, or call ``.wait(on_stdout=..., on_stderr=...)``.

        In a VM of an OCI image the image's config is the default: its ``Env`` under
        ``env`` (``env`` wins), its ``WorkingDir`` when ``cwd`` is None, its ``User`` when
        ``user`` is None (``user``: ``"name"``, ``"uid"``, ``"name:group"``, ``"uid:gid"``,
        looked up in the guest's /etc/passwd and /etc/group; ``"root"`` or ``"0"`` to
        override an image's user)."""
        self._check_running()
        if script is None and argv is None:
            raise ValueError("exec needs a script or argv")
        env, cwd, user = self._image_defaults(env, cwd, user)
        try:
            return self._agent.exec(argv, script=script, env=env, cwd=cwd, stdin=stdin,
                                    user=user)
        except AgentError as exc:
            raise self._explain(exc) from exc

    def _image_defaults(self, env, cwd, user):
        image = self.image
        if image is None:
            return env, cwd, user
        merged = dict(item.split("=", 1) for item in image.env if "=" in item)
        merged.update(env or {})
        return (merged, cwd if cwd is not None else (image.working_dir or "/"),
                user if user is not None else (image.user or None))

    def run_image_command(self, *, log_path: str = "/tmp/image-command.log",
                          env: dict[str, str] | None = None,
                          extra_args: list[str] | None = None) -> ExecProcess:
        """Start the image's ``Entrypoint`` + ``Cmd`` (+ ``extra_args``) as its service would
        start: in the background, with the image's Env, WorkingDir and User, its output
        appended to ``log_path`` in the guest **and** streamed by the returned handle (iterate
        it, ``.wait()``, or ``stop_command(handle)``). The command lives until it exits, the
        handle is stopped, or the VM stops; other commands run beside it meanwhile.

        Raises ``VmError`` when the VM runs no OCI image or the image has neither
        Entrypoint nor Cmd."""
        image = self.image
        if image is None:
            raise VmError(f"VM {self.name!r} runs the default guest, not an OCI image: "
                          "run_image_command needs a VM of Image.from_oci(…)")
        argv = [*image.entrypoint, *image.cmd, *(extra_args or [])]
        if not argv:
            raise VmError(f"image {image.ref} has neither Entrypoint nor Cmd: nothing to run "
                          "(use vm.exec(argv=[…]) instead)")
        # The initramfs's busybox tees the output into the log: the image needs no shell.
        from .devices.rootfs import GUEST_BUSYBOX
        script = ('set -o pipefail; "$0" "$@" 2>&1 | '
                  f"{GUEST_BUSYBOX} tee -a {_shell_quote(log_path)}")
        wrapper = [GUEST_BUSYBOX, "sh", "-c", script, *argv]
        return self.exec(argv=wrapper, env=env)

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

    def run(self, script: str | None = None, timeout: float | None = None,
            env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: bytes | None = None,
            on_stdout: Callable[[bytes], object] | None = None,
            on_stderr: Callable[[bytes], object] | None = None,
            max_output_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
            raise_interrupt: bool = True, user: str | None = None,
            argv: list[str] | None = None) -> ExecResult:
        """Run a shell script (``/bin/sh -c script``), or a program (``argv``), in the guest
        and wait for it (details: :func:`wait_command`). ``user``, and in a VM of an OCI image
        its defaults: see :meth:`exec`.

        On ``timeout`` (seconds) the command's process group is killed and the result, with
        ``timed_out=True``, comes back within ``timeout + KILL_GRACE_SECONDS`` even if
        children that escaped the group keep its output open; the VM stays usable.
        Callbacks see all output as it arrives; the result keeps the first
        ``max_output_bytes`` of each stream (default 16 MiB; ``stdout_truncated`` and
        ``stderr_truncated`` say when there was more). Ctrl-C stops the command (SIGINT,
        SIGTERM, SIGKILL) and raises ``KeyboardInterrupt``; with ``raise_interrupt=False``
        the result comes back with ``interrupted=True`` instead.
        """
        started = time.monotonic()
        proc = self.exec(script, argv=argv, env=env, cwd=cwd,
                         stdin=stdin if stdin is not None else False, user=user)
        try:
            return wait_command(proc, timeout, on_stdout=on_stdout, on_stderr=on_stderr,
                                max_output_bytes=max_output_bytes,
                                raise_interrupt=raise_interrupt, started=started)
        except AgentError as exc:
            raise self._explain(exc) from exc

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the guest agent, in seconds."""
        self._check_running()
        return self._agent.ping(timeout=timeout)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> int:
        self._check_running()
        return self._agent.write_file(path, data.encode() if isinstance(data, str) else data, mode)

    def read_file(self, path: str, max_bytes: int = DEFAULT_READ_LIMIT_BYTES,
                  timeout: float = 60.0) -> bytes:
        """A guest file's contents. Only regular files (a FIFO or a device is refused); a
        file larger than ``max_bytes`` (default 64 MiB) raises an error naming the path and
        the limit instead of being read into memory."""
        self._check_running()
        try:
            return self._agent.read_file(path, timeout=timeout, max_bytes=max_bytes)
        except AgentError as exc:
            raise self._explain(exc) from exc

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

    @property
    def balloon_target_mib(self) -> int:
        """The balloon size last asked for, in MiB (0: none; a restore keeps its snapshot's)."""
        return self._balloon_target_mib

    def balloon_stats(self) -> BalloonStats:
        """Balloon size (target/actual) and the guest's memory statistics."""
        return self._balloon_instance().balloon_stats(self._balloon_target_mib)

    def host_memory_bytes(self) -> int | None:
        """Host memory this VM holds resident now, in bytes (None once it has ended): the
        host's side of ballooning, whichever engine runs it."""
        if self.state not in ("running", "stopping"):
            return None
        return self._instance.host_rss_bytes()

    def mounts(self) -> list[MountStatus]:
        """The VM's virtio-fs mounts with their counters."""
        return self._instance.mount_status()

    def volumes(self) -> list[dict]:
        """The VM's volumes: paths, serial, read-only, size and host blocks used."""
        from .devices.volumes import usage
        return [{"host_path": str(v.path), "guest_path": v.spec.guest_path,
                 "serial": v.serial, "read_only": v.spec.read_only, **usage(v.path)}
                for v in self._spec.data_volumes]

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, path, *, overwrite: bool = False):
        """Save this VM (guest memory, vCPUs, irqchip, devices, volume contents) as a
        snapshot directory at ``path``; the guest pauses briefly and keeps running.

        Returns a :class:`~supermachine_jupyter.snapshots.Snapshot`;
        ``Image.from_snapshot(path).start()`` starts new VMs from it on the same engine
        (QEMU or the native core). virtio-fs mounts: the native core carries them (a
        restore re-attaches them and the guest's open files on them); QEMU refuses and says
        why."""
        self._check_running()
        from .snapshots.write import write_snapshot
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
            ended = self._state in ("stopped", "failed")
            if not ended:
                self._state = "stopping"
        self._stop_watching.set()
        if ended:
            if self._ender is not threading.current_thread():
                self._ended.wait(timeout)     # a failed VM's engine may be on its way out
            self._cleanup()
            self._join_helpers(timeout)
            return
        self._join_helpers(timeout)           # the watcher, before the engine goes
        try:
            self._instance.shutdown(self._agent, timeout)
        finally:
            self._agent.close()
            with self._lock:
                self._state = "stopped"
            self._cleanup()
            self._ended.set()

    def _join_helpers(self, timeout: float) -> None:
        """Wait for the watcher and the ender threads to finish, so a stopped VM leaves no
        thread behind (the watcher ends at once once told to, or once the VM has ended)."""
        for thread in (self._watcher, self._ender):
            if thread is not None and thread is not threading.current_thread() \
                    and thread.ident is not None:
                thread.join(timeout)

    def _cleanup(self) -> None:
        with self._lock:
            callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
        self._unsubscribe_console()
        shutil.rmtree(self._spec.run_dir, ignore_errors=True)
        _live_vms.discard(self)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the VM is stopped or failed and its engine is gone; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state in ("running", "stopping"):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self._ended.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


__all__ = ["Vm", "ExecResult", "stop_command", "wait_command", "program_command", "EngineError"]
