"""``%%vm`` and ``%vm``: run notebook cells inside microVMs.

::

    %load_ext supermachine_jupyter
    %%vm --memory 512 --vcpus 2 --name lab1
    uname -a; free -m

Output streams into the cell as the guest produces it (stdout to stdout, stderr to stderr);
the last line gives the exit status and timings. A VM started with ``--name`` stays up for
later cells (until ``%vm stop NAME`` or the kernel shuts down); an unnamed VM is stopped when
its cell ends. Interrupting the kernel sends SIGINT, then SIGTERM, then SIGKILL to the guest
command; the VM survives.

Line magic: ``%vm list``, ``%vm stop NAME|--all``, ``%vm console NAME``, ``%vm config NAME``,
``%vm panel NAME`` (the live dashboard; ``%%vm --panel`` shows it under a cell).
Defaults are traitlets: ``%config VmMagics.default_memory_mib = 512``.
"""

from __future__ import annotations

import argparse
import codecs
import math
import shlex
import sys
import threading
import time
from typing import Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Enum, Float, Int, TraitError

from .. import snapshots
from ..config import ENGINES, MountSpec, VmConfig, VolumeSpec
from ..errors import VmError
from ..vm import ExecResult, Vm

_MISSING = object()


class VmCommandError(VmError):
    """``%%vm --raise``: the guest command exited non-zero."""

    def __init__(self, result: ExecResult, name: str):
        self.result = result
        status = (f"killed by signal {result.signal}" if result.signal
                  else f"exit status {result.exit_code}")
        super().__init__(f"command in VM {name!r} failed with {status}")


class StatusLine:
    """The last line of a ``%%vm`` cell; renders as text and as HTML."""

    def __init__(self, name: str, engine: str, result: ExecResult | None, boot_s: float | None,
                 note: str = "", started_by: str = "boot", warning: bool = False):
        self.name, self.engine, self.result, self.boot_s, self.note = name, engine, result, boot_s, note
        self.started_by = started_by   # "boot" or "restore"
        #: the note reports something that went wrong (a lost VM): never shown as success
        self.warning = warning

    def _parts(self) -> tuple[str, bool]:
        r = self.result
        if r is None:
            return self.note, False
        if r.timed_out:
            status, ok = "timed out (command killed)", False
        elif r.signal:
            status, ok = f"killed by signal {r.signal}", False
        else:
            status, ok = f"exit {r.exit_code}", r.exit_code == 0
        boot = (f" · {self.started_by} {self.boot_s:.2f} s" if self.boot_s is not None else "")
        note = f" · {'⚠ ' if self.warning else ''}{self.note}" if self.note else ""
        return (f"[{self.name} · {self.engine}] {status} · {r.duration:.2f} s{boot}{note}",
                ok and not self.warning)

    def __repr__(self) -> str:
        return self._parts()[0]

    def _repr_html_(self) -> str:
        from html import escape
        text, ok = self._parts()
        colour = "#2e7d32" if ok else ("#b26a00" if self.warning else "#c62828")
        return (f"<div style='font-family:monospace;font-size:85%;color:{colour}'>"
                f"{escape(text)}</div>")


class _Progress:
    """A one-line progress display that updates in place while a VM boots."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.handle = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        text = _PlainText(f"⏳ {message}")
        if self.handle is None:
            self.handle = display(text, display_id=True)
        else:
            self.handle.update(text)

    def done(self, message: str) -> None:
        if self.enabled and self.handle is not None:
            self.handle.update(_PlainText(f"✓ {message}"))


class _PlainText:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _StreamWriter:
    """Decodes guest output incrementally (UTF-8 split across chunks) and writes it through,
    keeping the first ``keep_bytes`` for ``VmMagics.last_result``."""

    def __init__(self, stream_name: str, keep_bytes: int = 8 * 1024 * 1024):
        self._stream_name = stream_name
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._kept = bytearray()
        self._keep_bytes = keep_bytes

    @property
    def text(self) -> str:
        return self._kept.decode(errors="replace")

    def __call__(self, data: bytes) -> None:
        if len(self._kept) < self._keep_bytes:
            self._kept += data[:self._keep_bytes - len(self._kept)]
        text = self._decoder.decode(data)
        if text:
            target = getattr(sys, self._stream_name)
            target.write(text)
            target.flush()

    def finish(self) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            getattr(sys, self._stream_name).write(tail)


def _parse_volume(text: str) -> VolumeSpec:
    parts = text.split(":")
    usage = f"--volume {text!r}: expected HOST:GUEST[:SIZE_MIB][:ro|rw]"
    if len(parts) not in (2, 3, 4):
        raise TraitError(usage)
    read_only = False
    if parts[-1] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    elif len(parts) == 4:
        raise TraitError(f"{usage} (the last part must be ro or rw, got {parts[-1]!r})")
    size = None
    if len(parts) == 4 or len(parts) < 2:
        raise TraitError(usage)
    if len(parts) == 3:
        try:
            size = int(parts[2])
        except ValueError:
            raise TraitError(f"--volume {text!r}: SIZE_MIB must be an integer") from None
    return VolumeSpec(parts[0], parts[1], size_mib=size, read_only=read_only)


def _parse_mount(text: str) -> MountSpec:
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("ro", "rw")):
        raise TraitError(f"--mount {text!r}: expected HOST:TAG:GUEST[:ro]")
    return MountSpec(parts[0], parts[1], parts[2], read_only=len(parts) == 4 and parts[3] == "ro")


@magics_class
class VmMagics(Magics):
    """The ``%%vm`` cell magic and ``%vm`` line magic. Configurable with ``%config``."""

    default_memory_mib = Int(None, allow_none=True,
                             help="Memory (MiB) of VMs started without --memory; None: "
                                  "the image's default").tag(config=True)
    default_vcpus = Int(None, allow_none=True,
                        help="vCPUs of VMs started without --vcpus; None: the image's "
                             "default").tag(config=True)
    default_engine = Enum(list(ENGINES), "auto",
                          help="Engine of VMs started without --engine").tag(config=True)
    default_timeout = Float(None, allow_none=True,
                            help="Seconds a cell's command may run before it is killed; "
                                 "None: no limit").tag(config=True)
    boot_timeout = Float(120.0, help="Seconds to wait for a VM to boot").tag(config=True)
    snapshot_cache = Bool(True, help="Start VMs from the default image's cached pre-booted "
                                     "snapshot when the cell's config allows it (no volumes "
                                     "or mounts): ~10x faster than a cold boot"
                          ).tag(config=True)
    show_progress = Bool(True, help="Show a progress line while a VM boots and a status "
                                    "line when the command ends").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._vms: dict[str, Vm] = {}
        self._lock = threading.Lock()
        self._image = None
        #: the result of the last ``%%vm`` cell
        self.last_result: ExecResult | None = None

    # -- VM bookkeeping --------------------------------------------------------------------
    @property
    def vms(self) -> dict[str, Vm]:
        """Named VMs of this kernel (running or ended), by name."""
        return dict(self._vms)

    def image(self, progress: Callable[[str], None]):
        if self._image is None:
            from ..image import Image
            self._image = Image.default(progress)
        return self._image

    def _cell_changes(self, args: argparse.Namespace, base: VmConfig) -> dict:
        """The config fields this cell's options set, on top of ``base``."""
        changes: dict = {}
        if args.memory is not None:
            changes["memory_mib"] = args.memory
        if args.vcpus is not None:
            changes["vcpus"] = args.vcpus
        if args.balloon:
            changes["balloon"] = True
        if args.engine:
            changes["engine"] = args.engine
        if args.volume:
            changes["volumes"] = list(base.volumes) + [_parse_volume(v) for v in args.volume]
        if args.mount:
            changes["mounts"] = list(base.mounts) + [_parse_mount(m) for m in args.mount]
        if args.name:
            changes["name"] = args.name
        return changes

    def _build_config(self, args: argparse.Namespace) -> VmConfig:
        if args.config:
            base = self.shell.user_ns.get(args.config, _MISSING) if self.shell else _MISSING
            if base is _MISSING:
                raise TraitError(f"--config {args.config}: no variable of that name in the "
                                 "notebook's namespace (expected a VmConfig)")
            if not isinstance(base, VmConfig):
                raise TraitError(f"--config {args.config}: that variable is a "
                                 f"{type(base).__name__}, not a VmConfig")
        else:
            base = VmConfig(memory_mib=self.default_memory_mib, vcpus=self.default_vcpus,
                            engine=self.default_engine)
        changes = self._cell_changes(args, base)
        return base.replace(**changes) if changes else base

    def _get_or_start(self, config: VmConfig, progress: _Progress,
                      from_snapshot: str | None = None) -> tuple[Vm, bool, str, bool]:
        """The VM for this cell: a running named VM, or a new one (booted, restored from the
        default image's pre-booted snapshot, or from a named snapshot). Returns
        (vm, new, note, note_is_a_warning)."""
        name = config.name
        with self._lock:
            existing = self._vms.get(name) if name else None
        note = ""
        if existing is not None:
            if existing.state == "running":
                differs = [f for f in ("memory_mib", "vcpus", "balloon", "volumes", "mounts", "engine")
                           if getattr(config, f) != getattr(existing.config, f)
                           and getattr(config, f) not in (None, [], False, "auto")]
                if differs:
                    note = (f"{name} was already running: {', '.join(differs)} from this cell "
                            f"not applied (%vm stop {name} to restart it)")
                return existing, False, note, False
            # A named VM that ended on its own is never replaced silently: say so, and start
            # it again as it was (this cell's options still apply on top).
            why = existing.failure or existing.state
            note = f"VM {name} was lost ({why}); started again with its original config"
            sys.stderr.write(f"⚠ {note}\n")
            config = existing.config.replace(**self._restart_changes(config, existing.config))
        from ..image import Image
        if from_snapshot:
            image = Image.from_snapshot(snapshots.named_snapshot_path(from_snapshot))
            # Only what the user set: a restore keeps the snapshot's hardware.
            vm = image.start(VmConfig(name=config.name, restore_timeout=config.restore_timeout,
                                      vsock_mux_dir=config.vsock_mux_dir), progress=progress)
        else:
            # A config with its own kernel never needs the default image (building it would
            # cost a kernel build on a fresh machine).
            image = Image.from_assets(config.assets) if config.assets else self.image(progress)
            vm = image.start(config, progress=progress,
                                            boot_timeout=self.boot_timeout,
                                            snapshot_cache=None if self.snapshot_cache else False)
        if name:
            with self._lock:
                self._vms[name] = vm
        return vm, True, note, existing is not None

    @staticmethod
    def _restart_changes(cell: VmConfig, original: VmConfig) -> dict:
        """What a cell that restarts a lost VM sets beyond the VM's original config: the
        fields it gives a non-default value (its volumes and mounts replace the original's)."""
        return {f: getattr(cell, f) for f in ("memory_mib", "vcpus", "balloon", "volumes",
                                              "mounts", "engine")
                if getattr(cell, f) not in (None, [], False, "auto")
                and getattr(cell, f) != getattr(original, f)}

    # -- %%vm -----------------------------------------------------------------------------
    @magic_arguments()
    @argument("--memory", type=int, metavar="MIB", help="guest memory in MiB")
    @argument("--vcpus", type=int, metavar="N", help="number of vCPUs")
    @argument("--balloon", action="store_true", help="attach a virtio-balloon device")
    @argument("--volume", action="append", metavar="HOST:GUEST[:SIZE_MIB][:ro]",
              help="attach a persistent ext4 volume (repeatable)")
    @argument("--mount", action="append", metavar="HOST:TAG:GUEST[:ro]",
              help="share a host directory over virtio-fs (repeatable)")
    @argument("--name", metavar="NAME", help="keep the VM running under this name for later cells")
    @argument("--timeout", type=float, metavar="SECONDS", help="kill the command after this long")
    @argument("--engine", choices=list(ENGINES), help="auto (default), native or qemu")
    @argument("--config", metavar="VAR", help="start from the VmConfig in this notebook variable")
    @argument("--raise", dest="raise_error", action="store_true",
              help="raise an error when the command exits non-zero")
    @argument("--quiet", action="store_true", help="no progress or status line")
    @argument("--snapshot", metavar="NAME", help="after the cell, save the VM as snapshot NAME")
    @argument("--from", dest="from_snapshot", metavar="NAME",
              help="start the VM from snapshot NAME instead of booting")
    @argument("--panel", action="store_true",
              help="show the VM's live dashboard (console, balloon, mounts) under the cell")
    @cell_magic
    def vm(self, line: str, cell: str):
        """Run the cell's shell script inside a microVM.

        Output streams as it is produced; interrupt stops the command (SIGINT, SIGTERM,
        SIGKILL) and keeps a named VM running.
        """
        args = parse_argstring(self.vm, line)
        if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError(f"--timeout must be a number of seconds greater than 0, got "
                             f"{args.timeout!r} (leave it out for no limit)")
        try:
            config = self._build_config(args)
            for snapshot_name in filter(None, (args.snapshot, args.from_snapshot)):
                snapshots.named_snapshot_path(snapshot_name)    # a bad name fails before the cell runs
        except (TraitError, snapshots.SnapshotError) as exc:
            raise UsageError(str(exc)) from None
        progress = _Progress(self.show_progress and not args.quiet)
        vm, new, note, warning = self._get_or_start(config, progress, args.from_snapshot)
        if new:
            how = "restored" if vm.restored_from else "booted"
            progress.done(f"{vm.name} {how} on {vm.engine}/{vm.accel} in {vm.boot_seconds:.2f} s")
        if args.panel:
            # Shown before the command runs, so the panels follow it live.
            from ..widgets import VmDashboard
            display(VmDashboard(vm))
        keep = bool(config.name)
        timeout = args.timeout if args.timeout is not None else self.default_timeout
        out, err = _StreamWriter("stdout"), _StreamWriter("stderr")
        try:
            result = self._run_cell(vm, cell, timeout, out, err)
            if args.snapshot:
                snap = vm.snapshot(snapshots.named_snapshot_path(args.snapshot), overwrite=True)
                print(f"saved {vm.name} as snapshot {args.snapshot!r} ({snap.path})")
        finally:
            out.finish()
            err.finish()
            if not keep:
                vm.stop()
        self.last_result = result
        if self.show_progress and not args.quiet:
            display(StatusLine(vm.name, f"{vm.engine}/{vm.accel}", result,
                               vm.boot_seconds if new else None, note,
                               "restore" if vm.restored_from else "boot", warning))
        if args.raise_error and not result.ok:
            raise VmCommandError(result, vm.name)

    def _run_cell(self, vm: Vm, script: str, timeout: float | None,
                  out: _StreamWriter, err: _StreamWriter) -> ExecResult:
        # Vm.run owns deadline, kill on timeout and the Ctrl-C escalation (vm.wait_command);
        # here an interrupt ends the cell with the command's result, not a traceback.
        result = vm.run(script, timeout=timeout, on_stdout=out, on_stderr=err,
                        max_output_bytes=out._keep_bytes, raise_interrupt=False)
        if result.interrupted:
            sys.stderr.write(f"\n^C interrupted: guest command stopped ({result.describe()}); "
                             f"VM {vm.name} {'kept' if vm.config.name else 'stopped'}\n")
        return result

    # -- %vm ------------------------------------------------------------------------------
    @line_magic("vm")
    def vm_line(self, line: str):
        """%vm list | stop NAME... | stop --all | console NAME | config NAME | panel NAME | snapshots"""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%vm {line}: {exc}") from None
        if not words or words[0] in ("-h", "--help", "help"):
            print(self.vm_line.__doc__)
            return None
        command, rest = words[0], words[1:]
        if command == "list":
            # A VM stopped from elsewhere (the MicroVMs sidebar) is no longer listed.
            return VmTable([vm for vm in self._vms.values() if vm.state != "stopped"])
        if command == "stop":
            if rest == ["--all"]:
                names = list(self._vms)
            elif rest:
                names = rest
            else:
                raise UsageError("%vm stop needs a VM name or --all")
            for name in names:
                vm = self._lookup(name)
                vm.stop()
                with self._lock:
                    self._vms.pop(name, None)
                print(f"stopped {name}")
            return None
        if command == "console":
            print(self._lookup(self._one(rest, "console")).console_output())
            return None
        if command == "config":
            return self._lookup(self._one(rest, "config")).config
        if command == "panel":
            from ..widgets import VmDashboard
            return VmDashboard(self._lookup(self._one(rest, "panel")))
        if command == "snapshots":
            found = snapshots.list_snapshots()
            if not found:
                print("no named snapshots (save one with %%vm --name NAME --snapshot SNAP)")
            for snap in found:
                print(f"{snap.path.name}  {snap.header.get('memory_mib')} MiB  "
                      f"{snap.header.get('vcpus')} vCPU  saved {snap.header.get('created_at')}")
            return None
        raise UsageError(f"unknown %vm command {command!r}: use list, stop, console, config, "
                      "panel or snapshots")

    @staticmethod
    def _one(rest: list[str], command: str) -> str:
        if len(rest) != 1:
            raise UsageError(f"%vm {command} needs exactly one VM name")
        return rest[0]

    def _lookup(self, name: str) -> Vm:
        try:
            return self._vms[name]
        except KeyError:
            known = ", ".join(self._vms) or "none"
            raise UsageError(f"no VM named {name!r} in this kernel (named VMs: {known})") from None

    def stop_all(self) -> None:
        for name, vm in list(self._vms.items()):
            vm.stop(timeout=5)
            self._vms.pop(name, None)


class VmTable:
    """``%vm list``: a table of this kernel's named VMs."""

    def __init__(self, vms: list[Vm]):
        self.vms = vms

    def rows(self) -> list[tuple[str, str, str, int, int, str]]:
        return [(vm.name, vm.state, f"{vm.engine}/{vm.accel}", vm.memory_mib, vm.vcpus,
                 time.strftime("%H:%M:%S", time.localtime(vm.started_at))) for vm in self.vms]

    def __repr__(self) -> str:
        if not self.vms:
            return "no named VMs (start one with %%vm --name NAME)"
        header = ("NAME", "STATE", "ENGINE", "MiB", "vCPU", "STARTED")
        lines = [header] + [tuple(str(c) for c in row) for row in self.rows()]
        widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in lines)

    def _repr_html_(self) -> str:
        from html import escape
        if not self.vms:
            return "<i>no named VMs (start one with <code>%%vm --name NAME</code>)</i>"
        head = "".join(f"<th>{h}</th>" for h in ("name", "state", "engine", "MiB", "vCPU", "started"))
        body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                       for row in self.rows())
        return f"<table><tr>{head}</tr>{body}</table>"


def load_ipython_extension(ipython) -> None:
    magics = VmMagics(ipython)
    ipython.register_magics(magics)
    ipython._supermachine_magics = magics


def unload_ipython_extension(ipython) -> None:
    magics = getattr(ipython, "_supermachine_magics", None)
    if magics is not None:
        magics.stop_all()
