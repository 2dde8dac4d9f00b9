"""``%%vm`` and ``%vm``: run notebook cells inside microVMs.

::

    %load_ext supermachine_jupyter

    %%vm --memory 512 --vcpus 2 --name lab1
    uname -a; free -m

Output streams into the cell as the guest produces it (stdout to stdout, stderr to stderr);
a last line gives the exit status and how long the VM took to start. A VM started with
``--name`` stays up for later cells (until ``%vm stop NAME`` or the kernel shuts down); an
unnamed VM is stopped when its cell ends. Interrupting the kernel sends SIGINT, then SIGTERM,
then SIGKILL to the guest command; the VM survives. ``--out``/``--err``/``--bg`` capture
output into notebook variables and run in the background, as IPython's ``%%script`` does.

Line magic: ``%vm list``, ``%vm info [NAME]``, ``%vm stop NAME|--all``, ``%vm jobs``,
``%vm console NAME``, ``%vm config NAME``, ``%vm panel NAME``, ``%vm snapshots``.
Defaults are traitlets: ``%config VmMagics.default_memory_mib = 512``.
"""

from __future__ import annotations

import argparse
import codecs
import functools
import inspect
import math
import shlex
import sys
import threading
import time
from collections.abc import Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import (
    argument,
    argument_group,
    kwds,
    magic_arguments,
    parse_argstring,
)
from IPython.display import display
from traitlets import Bool, Enum, Float, Int, TraitError

from .. import snapshots
from ..config import ENGINES, MountSpec, VmConfig, VolumeSpec
from ..errors import VmError
from ..launch import snapshot_label
from ..vm import ExecResult, Vm, program_command
from ..widgets.format import FAILED_MARK, OK_MARK, PROGRESS_MARK, WARNING_MARK, clock

_MISSING = object()


def _h(text: str) -> str:
    """An option's help text as written: argparse %-formats help strings, and ours name
    magics (``%vm stop``)."""
    return text.replace("%", "%%")

#: The examples at the end of ``%%vm?`` (argparse's epilog, printed as written).
CELL_EXAMPLES = """\
examples:

  %%vm
  uname -a; free -m                 # a fresh VM for this cell only

  %%vm --name lab1 --memory 512 --vcpus 2
  echo hello > /root/note           # lab1 stays up for the next cells

  %%vm --name lab1 --timeout 5 --raise
  cat /root/note                    # same VM; a non-zero exit fails the cell

  %%vm --out listing --err problems
  ls /bin; ls /nowhere              # then, in Python: listing.split(), problems

  %%vm --bg --out log
  for i in 1 2 3; do echo $i; sleep 1; done    # returns at once; print(log) later

  %%vm --mount /srv/data:data:/mnt/data:ro --memory {mib}
  ls /mnt/data                      # {mib}: the notebook variable's value

  %%vm --name lab2 --balloon --panel
  cat /proc/meminfo                 # live console, balloon and mounts under the cell
"""


class VmCommandError(VmError):
    """``%%vm --raise``: the guest command exited non-zero."""

    def __init__(self, result: ExecResult, name: str):
        self.result = result
        status = (f"killed by signal {result.signal}" if result.signal
                  else f"exit status {result.exit_code}")
        super().__init__(f"command in VM {name!r} failed with {status}")


class StatusLine:
    """The last line of a ``%%vm`` cell, short and plain: the VM, how its command ended,
    how long it ran and (for a new VM) how long the VM took to start, e.g.
    ``✓ lab1: exit 0 after 0.05 s · VM restored in 0.21 s``. Engine details are in
    ``%vm info`` (or ``%%vm --verbose``). Renders as text and as HTML."""

    def __init__(self, name: str, result: ExecResult | None, start_s: float | None,
                 note: str = "", started_by: str = "booted", warning: bool = False,
                 details: str = ""):
        self.name, self.result, self.start_s, self.note = name, result, start_s, note
        self.started_by = started_by   # "booted" or "restored"
        #: the note reports something that went wrong (a lost VM): never shown as success
        self.warning = warning
        #: shown after the line with ``--verbose`` (engine, accelerator and why)
        self.details = details

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok and not self.warning

    def text(self) -> str:
        r = self.result
        if r is None:
            return self.note
        if r.timed_out:
            status = "timed out, command killed"
        elif r.interrupted:
            status = f"interrupted ({r.describe()})"
        else:
            status = r.describe()       # "exit 3", "killed by SIGKILL", never "exit None"
        mark = OK_MARK if self.ok else (WARNING_MARK if self.warning else FAILED_MARK)
        start = (f" · VM {self.started_by} in {self.start_s:.2f} s"
                 if self.start_s is not None else "")
        note = f" · {self.note}" if self.note else ""
        details = f" · {self.details}" if self.details else ""
        return f"{mark} {self.name}: {status} after {r.duration:.2f} s{start}{note}{details}"

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from html import escape
        colour = "#2e7d32" if self.ok else ("#b26a00" if self.warning else "#c62828")
        return (f"<div style='font-family:monospace;font-size:85%;color:{colour}'>"
                f"{escape(self.text())}</div>")


class _Progress:
    """A one-line progress display that updates in place while a VM starts, and is emptied
    once it has (the status line at the end says how long the start took). ``--verbose``
    keeps every message instead."""

    def __init__(self, enabled: bool, verbose: bool = False):
        self.enabled = enabled
        self.verbose = verbose
        self.handle = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        text = _PlainText(f"{PROGRESS_MARK} {message}")
        if self.verbose:
            display(text)
        elif self.handle is None:
            self.handle = display(text, display_id=True)
        else:
            self.handle.update(text)

    def done(self) -> None:
        if self.enabled and self.handle is not None:
            self.handle.update(_PlainText(""))


class _PlainText:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _StreamWriter:
    """Decodes guest output incrementally (UTF-8 split across chunks) and writes it through,
    keeping the first ``keep_bytes`` for ``VmMagics.last_result``. With ``variable`` (``--out
    VAR`` / ``--err VAR``) the text is appended to that notebook variable instead of being
    shown, as IPython's ``%%script --out`` does."""

    def __init__(self, stream_name: str, keep_bytes: int = 8 * 1024 * 1024,
                 variable: str | None = None, namespace: dict | None = None):
        self._stream_name = stream_name
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._kept = bytearray()
        self._keep_bytes = keep_bytes
        self._variable = variable
        self._namespace = namespace
        self._captured = ""
        if variable is not None:
            namespace[variable] = ""

    @property
    def text(self) -> str:
        return self._kept.decode(errors="replace")

    def __call__(self, data: bytes) -> None:
        if len(self._kept) < self._keep_bytes:
            self._kept += data[:self._keep_bytes - len(self._kept)]
        self._write(self._decoder.decode(data))

    def finish(self) -> None:
        self._write(self._decoder.decode(b"", final=True))

    def _write(self, text: str) -> None:
        if not text:
            return
        if self._variable is not None:
            # A new string each time (as %%script does), from our own copy: a user who
            # rebinds the variable meanwhile gets it back, not a TypeError on a thread.
            self._captured += text
            self._namespace[self._variable] = self._captured
            return
        target = getattr(sys, self._stream_name)
        target.write(text)
        target.flush()


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
        #: the result of the last ``%%vm`` cell (background cells: see ``jobs``)
        self.last_result: ExecResult | None = None
        #: the ``%%vm --bg`` cells of this kernel, oldest first (``%vm jobs``)
        self.jobs: list[BackgroundRun] = []
        #: the dashboard the last ``%%vm --panel`` cell showed
        self.last_panel = None
        self._last_vm: Vm | None = None

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

    def oci_image(self, ref: str, pull: str, progress: Callable[[str], None]):
        """``Image.from_oci(ref)``: pulled when not cached (``pull``); an image that cannot
        be had is a UsageError naming it and why."""
        from ..errors import ImageError
        from ..image import Image
        try:
            return Image.from_oci(ref, pull=pull, progress=progress)
        except ImageError as exc:
            raise UsageError(f"--image {ref}: {exc}") from None

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
                      from_snapshot: str | None = None, image_ref: str | None = None,
                      pull: str = "missing") -> tuple[Vm, bool, str, bool]:
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
                running_ref = existing.image.ref if existing.image is not None else None
                if image_ref and image_ref != running_ref:
                    differs.append(f"image {image_ref}")
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
            if image_ref is None and existing is not None and existing.image is not None:
                image_ref = existing.image.ref      # a lost named VM comes back as it was
            if image_ref:
                image = self.oci_image(image_ref, pull, progress)
            elif config.assets:
                image = Image.from_assets(config.assets)
            else:
                image = self.image(progress)
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
    @magic_arguments(name="%vm")     # the usage line is "%" + this: "%%vm [...]"
    @kwds(epilog=CELL_EXAMPLES)
    @argument_group("the VM")
    @argument("--name", metavar="NAME",
              help=_h("keep the VM running under this name for later cells (%%vm --name NAME "
                   "again runs in it; %vm stop NAME ends it). Without --name the VM stops "
                   "when the cell ends"))
    @argument("--memory", type=int, metavar="MIB",
              help=_h("guest memory in MiB (default 256, or %config VmMagics.default_memory_mib)"))
    @argument("--vcpus", type=int, metavar="N",
              help=_h("number of vCPUs (default 1, or %config VmMagics.default_vcpus)"))
    @argument("--balloon", action="store_true",
              help="attach a virtio-balloon device (the panel's Balloon tab can then take "
                   "memory back from the guest)")
    @argument("--volume", action="append", metavar="HOST:GUEST[:SIZE_MIB][:ro]",
              help="attach a persistent ext4 volume: the host file HOST appears at GUEST "
                   "(repeatable)")
    @argument("--mount", action="append", metavar="HOST:TAG:GUEST[:ro]",
              help="share the host directory HOST at GUEST over virtio-fs (repeatable)")
    @argument("--engine", choices=list(ENGINES), help="auto (default), native or qemu")
    @argument("--config", metavar="VAR",
              help="start from the VmConfig in the notebook variable VAR (the options here "
                   "override it)")
    @argument("--image", metavar="REF",
              help="boot the OCI image REF (e.g. python:3.12-slim) instead of the busybox "
                   "guest: pulled once and cached by digest; its Env, WorkingDir and User "
                   "apply to the cell; later unnamed cells restore its pre-booted snapshot")
    @argument("--pull", choices=["missing", "always", "never"], default="missing",
              help="with --image: pull when not cached (missing, the default), always check "
                   "the registry, or never (cache only)")
    @argument("--from", dest="from_snapshot", metavar="NAME",
              help="start the VM from snapshot NAME (made with --snapshot) instead of booting")
    @argument_group("the command")
    @argument("--timeout", type=float, metavar="SECONDS",
              help="kill the command after this long (the VM stays)")
    @argument("--raise", dest="raise_error", action="store_true",
              help="a non-zero exit becomes a cell error (VmCommandError), e.g. to stop "
                   "'Run all'")
    @argument("--out", metavar="VAR",
              help="put the command's stdout into the notebook variable VAR (a str) "
                   "instead of showing it")
    @argument("--err", metavar="VAR",
              help="put the command's stderr into the notebook variable VAR (a str) "
                   "instead of showing it")
    @argument("--bg", action="store_true",
              help=_h("run in the background: the cell returns at once and output goes only "
                   "into the --out/--err variables as it arrives; the VM is kept while the "
                   "command runs; %vm jobs lists background cells"))
    @argument("--snapshot", metavar="NAME", help="after the cell, save the VM as snapshot NAME")
    @argument_group("what the cell shows")
    @argument("--panel", action="store_true",
              help="show the VM's live dashboard (console, balloon, mounts) under the cell; "
                   "for an unnamed VM it follows this cell's run, then says the VM ended")
    @argument("--quiet", action="store_true", help="no progress or status line")
    @argument("--verbose", action="store_true",
              help="every start-up step, and the engine and why it was chosen on the "
                   "status line")
    @argument("interpreter", nargs=argparse.REMAINDER, metavar="INTERPRETER [ARGS]",
              help=_h("run the cell with this program of the guest, the cell on its stdin (as "
                      "%%script does), e.g. python3; default: sh. Goes after the options"))
    @cell_magic
    def vm(self, line: str, cell: str):
        """Run the cell's shell script inside a microVM: a small Linux guest (busybox, no
        network) with its own kernel, memory and filesystem.

        The script runs as root under /bin/sh; with an INTERPRETER after the options
        (``%%vm --image python:3.12-slim python3``) that program runs instead, with the cell
        on its standard input, as ``%%script`` does: the cell body is the program, so it cannot
        read input of its own from stdin (a cell has none to give anyway), and no file is left
        in the guest. With --image REF the VM boots that OCI image (its root file system under
        a writable layer that lives as long as the VM; --name keeps it, and its files, for
        later cells) and the cell runs with the image's Env, WorkingDir and User. Output streams into the cell as it is
        produced; a last line gives the exit status, how long the command ran and, for a
        new VM, how long the VM took to start. A new VM has 256 MiB and 1 vCPU unless told
        otherwise, and is restored from a cached pre-booted snapshot when it can (no
        --volume or --mount): a fraction of a second instead of a boot.

        An unnamed VM is stopped when its cell ends; --name keeps it for later cells.
        Interrupting the kernel stops the command (SIGINT, then SIGTERM, then SIGKILL) and
        keeps a named VM running.

        Options may use notebook variables: {expr} and $name are replaced by their value
        (IPython's variable expansion), as in --memory {mib} or --out {var_name}; write {{
        and }} for a literal brace. The cell body is not expanded: $HOME in it is the
        guest's. %vm? lists the commands that manage VMs (list, info, stop, ...).
        """
        args = parse_argstring(self.vm, line)
        if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError(f"--timeout must be a number of seconds greater than 0, got "
                             f"{args.timeout!r} (leave it out for no limit)")
        self._check_output_options(args)
        try:
            config = self._build_config(args)
            for snapshot_name in filter(None, (args.snapshot, args.from_snapshot)):
                snapshots.named_snapshot_path(snapshot_name)    # a bad name fails before the cell runs
        except (TraitError, snapshots.SnapshotError) as exc:
            raise UsageError(str(exc)) from None
        progress = _Progress(self.show_progress and not args.quiet, args.verbose)
        if args.image and args.from_snapshot:
            raise UsageError("--image and --from cannot be used together: a snapshot already "
                             "holds its image")
        if args.interpreter and not args.interpreter[0].strip():
            raise UsageError("the interpreter after the options is empty")
        vm, new, note, warning = self._get_or_start(config, progress, args.from_snapshot,
                                                    image_ref=args.image, pull=args.pull)
        self._last_vm = vm
        progress.done()
        keep = bool(config.name)
        dashboard = None
        if args.panel:
            # Shown before the command runs, so the panels follow it live.
            from ..widgets import VmDashboard
            dashboard = VmDashboard(vm)
            self.last_panel = dashboard
            display(dashboard)
        timeout = args.timeout if args.timeout is not None else self.default_timeout
        namespace = self.shell.user_ns if self.shell is not None else {}
        out = _StreamWriter("stdout", variable=args.out, namespace=namespace)
        err = _StreamWriter("stderr", variable=args.err, namespace=namespace)
        status = functools.partial(
            StatusLine, vm.name, start_s=vm.boot_seconds if new else None, note=note,
            started_by="restored" if vm.restored_from else "booted", warning=warning,
            details=_engine_details(vm) if args.verbose else "")
        if args.bg:
            self._start_background(vm, keep, cell, timeout, out, err, dashboard, args.quiet,
                                   interpreter=args.interpreter)
            return
        try:
            result = self._run_cell(vm, cell, timeout, out, err, interpreter=args.interpreter)
            if args.snapshot:
                snap = vm.snapshot(snapshots.named_snapshot_path(args.snapshot), overwrite=True)
                print(f"saved {vm.name} as snapshot {args.snapshot!r} ({snap.path})")
        finally:
            out.finish()
            err.finish()
            if not keep:
                vm.stop()
                _say_ended_with_cell(dashboard, vm)
        self.last_result = result
        if self.show_progress and not args.quiet:
            display(status(result))
        if args.raise_error and not result.ok:
            raise VmCommandError(result, vm.name)

    @staticmethod
    def _check_output_options(args: argparse.Namespace) -> None:
        for option in ("out", "err"):
            variable = getattr(args, option)
            if variable is not None and not variable.isidentifier():
                raise UsageError(f"--{option} {variable!r}: expected a Python variable name")
        if args.out is not None and args.out == args.err:
            raise UsageError(f"--out and --err name the same variable {args.out!r}: give "
                             "each stream its own")
        if args.bg:
            for option, why in (("raise_error", "--raise"), ("snapshot", "--snapshot")):
                if getattr(args, option):
                    raise UsageError(f"{why} cannot be used with --bg: a background cell "
                                     "returns before its command ends")

    def _run_cell(self, vm: Vm, script: str, timeout: float | None,
                  out: _StreamWriter, err: _StreamWriter,
                  interpreter: list[str] | None = None) -> ExecResult:
        # Vm.run owns deadline, kill on timeout and the Ctrl-C escalation (vm.wait_command);
        # here an interrupt ends the cell with the command's result, not a traceback.
        result = vm.run(**program_command(script, interpreter), timeout=timeout, on_stdout=out,
                        on_stderr=err, max_output_bytes=out._keep_bytes, raise_interrupt=False)
        if result.interrupted:
            sys.stderr.write(f"\n^C interrupted: guest command stopped ({result.describe()}); "
                             f"VM {vm.name} {'kept' if vm.config.name else 'stopped'}\n")
        return result

    def _start_background(self, vm: Vm, keep: bool, script: str, timeout: float | None,
                          out: _StreamWriter, err: _StreamWriter, dashboard,
                          quiet: bool, interpreter: list[str] | None = None) -> BackgroundRun:
        """``--bg``: run ``script`` on a thread. An unnamed VM is listed under its own name
        while the command runs (so ``%vm stop NAME``/``--all`` and kernel shutdown end it)
        and stopped when the command ends."""
        if not keep:
            with self._lock:
                self._vms[vm.name] = vm

        def finished(job: BackgroundRun) -> None:
            out.finish()
            err.finish()
            if not keep:
                with self._lock:
                    if self._vms.get(vm.name) is vm:
                        self._vms.pop(vm.name)
                vm.stop()
                _say_ended_with_cell(dashboard, vm)

        job = BackgroundRun(vm, script, timeout, out, err, on_end=finished,
                            interpreter=interpreter)
        self.jobs.append(job)
        if self.show_progress and not quiet:
            where = [f"stdout → {out._variable}" if out._variable else "",
                     f"stderr → {err._variable}" if err._variable else ""]
            into = ", ".join(w for w in where if w) or "output kept in %vm jobs"
            print(f"{PROGRESS_MARK} {vm.name}: running in the background ({into}); "
                  "%vm jobs shows when it ends")
        return job

    # -- %vm ------------------------------------------------------------------------------
    @line_magic("vm")
    def vm_line(self, line: str):
        """%vm list | info [NAME] | stop NAME... | stop --all | jobs | console NAME | config NAME | panel NAME | snapshots

        Manage this kernel's VMs (%%vm runs a cell in one; %%vm? shows its options).

          %vm list             the named VMs of this kernel: state, size, when started
          %vm info [NAME]      all about one VM: engine and why it was chosen, size,
                               boot or restore time, volumes and mounts (host path →
                               guest path); without NAME, the VM of the last %%vm cell
          %vm stop NAME...     stop named VMs (and any background command in them)
          %vm stop --all       stop every VM this kernel started
          %vm jobs             the background cells (%%vm --bg): running or how they ended
          %vm console NAME     the VM's serial console (kernel messages, init)
          %vm config NAME      the VmConfig it was started with
          %vm panel NAME       its live dashboard: console, balloon, mounts
          %vm snapshots        the snapshots saved with %%vm --snapshot NAME

        Examples:

          %vm list
          %vm info lab1
          %vm stop lab1
          %vm stop --all

        The MicroVMs sidebar in JupyterLab lists the VMs of every kernel of this user.
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%vm {line}: {exc}") from None
        if not words or words[0] in ("-h", "--help", "help"):
            print(inspect.cleandoc(self.vm_line.__doc__))
            return None
        command, rest = words[0], words[1:]
        if command == "list":
            # A VM stopped from elsewhere (the MicroVMs sidebar) is no longer listed.
            return VmTable([vm for vm in self._vms.values() if vm.state != "stopped"])
        if command == "info":
            if len(rest) > 1:
                raise UsageError("%vm info takes at most one VM name")
            if rest:
                return VmInfo(self._lookup(rest[0]))
            if self._last_vm is None:
                raise UsageError("%vm info: no %%vm cell has run yet in this kernel; "
                                 "give a VM name")
            return VmInfo(self._last_vm)
        if command == "jobs":
            return JobTable(list(self.jobs))
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
        raise UsageError(f"unknown %vm command {command!r}: use list, info, stop, jobs, "
                         "console, config, panel or snapshots (%vm? explains each)")

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
        for job in list(self.jobs):
            job.wait(5)


def _engine_details(vm: Vm) -> str:
    """``qemu/tcg (why)``: what ``--verbose`` adds to the status line."""
    return f"{vm.engine}/{vm.accel} ({vm.engine_reason})"


def _say_ended_with_cell(dashboard, vm: Vm) -> None:
    """An unnamed VM's panel outlives it: say plainly why it shows a stopped VM."""
    if dashboard is not None:
        from ..widgets.format import note_html
        dashboard.progress.value = note_html(
            f"{vm.name} ended with its cell: a VM without --name stops when its cell ends "
            "(use %%vm --name NAME --panel to keep it and this panel for later cells)")


class BackgroundRun:
    """A ``%%vm --bg`` cell: its command runs on a thread; its output goes into the
    ``--out``/``--err`` variables as it arrives (and is kept in ``result``).

    ``done``, ``result`` (an ``ExecResult`` once ended; None while running or when the VM was
    stopped under it: ``error`` then says why), ``wait(timeout)``. Unlike ``%%script --bg``,
    whose variables are stream readers, the variables are plain strings that grow."""

    def __init__(self, vm: Vm, script: str, timeout: float | None, out: _StreamWriter,
                 err: _StreamWriter, on_end: Callable[[BackgroundRun], None],
                 interpreter: list[str] | None = None):
        self.vm_name = vm.name
        self.started_at = time.time()
        self.out_variable, self.err_variable = out._variable, err._variable
        self.result: ExecResult | None = None
        self.error: str | None = None
        self._ended_at: float | None = None

        def run() -> None:
            try:
                self.result = vm.run(**program_command(script, interpreter), timeout=timeout,
                                     on_stdout=out, on_stderr=err,
                                     max_output_bytes=out._keep_bytes)
            except Exception as exc:  # noqa: BLE001 - kept for %vm jobs, the thread ends
                self.error = str(exc)
            finally:
                self._ended_at = time.time()
                on_end(self)

        self.thread = threading.Thread(target=run, name=f"vm-bg-{vm.name}", daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        """Wait for the command to end (at most ``timeout`` seconds); its result."""
        self.thread.join(timeout)
        return self.result

    def state(self) -> str:
        if not self.done:
            return f"running for {time.time() - self.started_at:.1f} s"
        if self.result is not None:
            how = "timed out, command killed" if self.result.timed_out else self.result.describe()
            return f"{how} after {self.result.duration:.2f} s"
        return f"ended: {self.error}"

    def __repr__(self) -> str:
        into = ", ".join(f"{stream} → {var}" for stream, var in
                         (("stdout", self.out_variable), ("stderr", self.err_variable)) if var)
        return f"<BackgroundRun on {self.vm_name!r}: {self.state()}{'; ' + into if into else ''}>"


class JobTable:
    """``%vm jobs``: this kernel's background cells, oldest first."""

    def __init__(self, jobs: list[BackgroundRun]):
        self.jobs = jobs

    def __repr__(self) -> str:
        if not self.jobs:
            return "no background cells (start one with %%vm --bg --out VAR)"
        return "\n".join(f"{i}  {job.vm_name}  started {clock(job.started_at)}  {job.state()}"
                         for i, job in enumerate(self.jobs))


class VmInfo:
    """``%vm info``: everything about one VM, one fact a line."""

    def __init__(self, vm: Vm):
        self.vm = vm

    def lines(self) -> list[tuple[str, str]]:
        vm = self.vm
        how = (f"restored from {snapshot_label(vm.restored_from)}" if vm.restored_from
               else "booted")
        rows = [("state", vm.state + (f" ({vm.failure})" if vm.failure else "")),
                ("size", f"{vm.memory_mib} MiB, {vm.vcpus} vCPU"
                         + (", balloon" if vm.config.balloon else "")),
                ("engine", f"{vm.engine}/{vm.accel}: {vm.engine_reason}"),
                ("started", f"{clock(vm.started_at)}, {how} in {vm.boot_seconds:.2f} s")]
        if vm.image is not None:
            from ..devices.rootfs import short_digest
            image = f"{vm.image.ref} ({short_digest(vm.image.digest)}), {vm.image.rootfs}"
            rows.append(("image", image))
        for volume in vm.config.volumes:
            rows.append(("volume", f"{volume.host_path} → {volume.guest_path}"
                                   + (" (read-only)" if volume.read_only else "")))
        for mount in vm.config.mounts:
            rows.append(("mount", f"{mount.host_path} → {mount.guest_path} (tag {mount.tag}"
                                  + (", read-only)" if mount.read_only else ")")))
        return rows

    def __repr__(self) -> str:
        return "\n".join([self.vm.name] + [f"  {key:<8} {value}" for key, value in self.lines()])

    def _repr_html_(self) -> str:
        from html import escape
        body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{escape(k)}</th>"
                       f"<td style='text-align:left'>{escape(v)}</td></tr>"
                       for k, v in self.lines())
        return f"<b>{escape(self.vm.name)}</b><table>{body}</table>"




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
