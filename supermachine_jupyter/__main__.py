"""Command line: ``python -m supermachine_jupyter {assets,run,doctor}``.

* ``assets [--build]``: print the guest kernel and initramfs VMs boot (a wheel's packaged
  guest, or the build in the user cache; built when there is neither); ``--build`` builds
  them from the guest sources into the cache (for a changed kernel config).
* ``run 'SCRIPT'``: run a shell script in a new VM, stream its output, exit with its status.
  The VM is restored from the pre-booted snapshot when it can, as ``%%vm`` cells are
  (``--fresh`` boots one instead; ``SUPERMACHINE_SNAPSHOT_CACHE=0`` turns the cache off).
  ``--image REF`` boots an OCI image instead (as ``%%vm --image REF``); ``--interpreter
  python3`` runs the script with that guest program, the script on its stdin.
* ``doctor [--json]``: what this machine offers (KVM, QEMU, assets) and which engine ``auto``
  picks, and why; each check is announced on stderr as it runs (they take seconds).
* ``notebook PATH``: execute a notebook headless and print each cell's output (``make demo``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time


def cmd_assets(args: argparse.Namespace) -> int:
    from .guest.assets import main_assets
    return main_assets(["--build"] if args.build else [])


def cmd_run(args: argparse.Namespace) -> int:
    from .config import VmConfig
    from .image import Image
    from .vm import program_command

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[vm] {line}", file=sys.stderr, flush=True)

    def write(stream):
        def take(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return take

    config = VmConfig(memory_mib=args.memory, vcpus=args.vcpus, engine=args.engine)
    # The cache policy is the caller's (snapshots/cache.py): the magic's, unless --fresh.
    image = (Image.from_oci(args.image, pull=args.pull, progress=say) if args.image
             else Image.default(say))
    # As %%vm INTERPRETER: the program runs with the script on its stdin.
    command = program_command(args.script, shlex.split(args.interpreter or ""))
    with image.start(config, progress=say, snapshot_cache=False if args.fresh else None) as vm:
        how = "restored" if vm.restored_from else "booted"
        say(f"{vm.name} {how} in {vm.boot_seconds:.2f} s")
        # Output is streamed, not kept: Vm.run does timeout and Ctrl-C (vm.wait_command).
        result = vm.run(**command, timeout=args.timeout, on_stdout=write(sys.stdout.buffer),
                        on_stderr=write(sys.stderr.buffer), max_output_bytes=0,
                        raise_interrupt=False)
    if result.interrupted:
        say(f"interrupted; command stopped ({result.describe()})")
        return 130
    if result.timed_out:
        say(f"timed out after {args.timeout} s; command killed")
        return 124
    if result.signal:
        return 128 + result.signal
    return result.exit_code or 0


def cmd_notebook(args: argparse.Namespace) -> int:
    """Execute a notebook headless (nbclient), printing each cell's output as it completes."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(args.path, as_version=4)

    def show(cell, cell_index, execute_reply) -> None:
        if cell.cell_type != "code":
            return
        print(f"\n── cell {cell_index}: {cell.source.splitlines()[0] if cell.source else ''}",
              flush=True)
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                # Both streams go to stdout so the transcript keeps the cell's order.
                sys.stdout.write(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                print(output.get("data", {}).get("text/plain", ""))
            elif output.output_type == "error":
                print(f"{output.ename}: {output.evalue}")
        sys.stdout.flush()

    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.path))}},
                            on_cell_executed=show)
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"notebook failed: {str(exc).splitlines()[-1] if str(exc) else exc}", file=sys.stderr)
        return 1
    if args.write:
        nbformat.write(nb, args.path)
    return 0


class DoctorSteps:
    """Announces each doctor check as it starts and says how long it took, one line each
    (``◷ KVM speed… 0.4 s``), so the seconds a full check takes are never silent."""

    def __init__(self, stream=None):
        self.stream = stream
        self.seen: list[str] = []

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.seen.append(what)
        started = time.monotonic()
        self._write(f"◷ {what}…")
        try:
            yield
        finally:
            self._write(f" {time.monotonic() - started:.1f} s\n")

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()


def doctor_report(step: DoctorSteps | None = None) -> dict:
    from . import __version__
    from .engines import choose_engine, native_available
    from .engines.accel import kvm_status
    from .engines.qemu.engine import qemu_binary
    from .guest.assets import find_assets

    step = step or DoctorSteps()
    with step("KVM: present, and how fast (calibrated once per host boot)"):
        kvm = kvm_status()
    with step("QEMU and the guest kernel"):
        qemu = qemu_binary()
        assets = find_assets()
    report: dict = {
        "version": __version__,
        "kvm": {"device": os.path.exists("/dev/kvm"), **kvm.to_dict()},
        "qemu": {"binary": qemu},
        "assets": ({"kernel": str(assets.kernel), "vmlinux": str(assets.vmlinux),
                    "initrd": str(assets.initrd), "origin": assets.origin}
                   if assets else None),
    }
    with step("native core: can it load"):
        ok, why = native_available()
    report["native"] = {"available": ok, "detail": why}
    try:
        from .engines import native as native_engine
        report["native"].update(native_engine.doctor(step=step))
    except (ImportError, AttributeError):
        pass
    try:
        choice = choose_engine("auto")
        report["auto"] = {"engine": choice.name, "accel": choice.accel, "reason": choice.reason}
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not fail
        report["auto"] = {"engine": None, "reason": str(exc)}
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    # Progress on stderr: stdout stays the report (JSON with --json).
    report = doctor_report(DoctorSteps(None if args.quiet else sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    kvm = report["kvm"]
    hints = f" [{'; '.join(kvm['hints'])}]" if kvm["hints"] else ""
    kvm_summary = f"{kvm['speed']}: {kvm['reason']}{hints}"
    lines = [
        f"supermachine_jupyter {report['version']}",
        f"/dev/kvm      {'present' if kvm['device'] else 'absent'}; {kvm_summary}",
        f"QEMU          {report['qemu']['binary'] or 'not found (apt-get install qemu-system-x86)'}",
        f"guest assets  {report['assets']['kernel'] + ' + initramfs (' + report['assets']['origin'] + ')' if report['assets'] else 'not built (python -m supermachine_jupyter assets)'}",
        f"native core   {'available' if report['native']['available'] else 'unavailable'}: "
        f"{report['native']['detail']}",
        f"engine=auto   → {report['auto']['engine']}"
        + (f"/{report['auto'].get('accel')}" if report['auto'].get('accel') else "")
        + f": {report['auto']['reason']}",
    ]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supermachine_jupyter",
                                     description="Run commands in supermachine microVMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    assets = sub.add_parser("assets", help="print the guest kernel and initramfs VMs boot "
                                           "(building them when there are none)")
    assets.add_argument("--build", action="store_true",
                        help="build them from the guest sources into the user cache (needs "
                             "the kernel build tools; for a changed kernel config)")
    run = sub.add_parser("run", help="run a shell script in a new VM (restored from the "
                                     "pre-booted snapshot when it can; --fresh boots one)")
    run.add_argument("script")
    run.add_argument("--fresh", action="store_true",
                     help="boot a fresh VM instead of restoring the pre-booted snapshot")
    run.add_argument("--memory", type=int, default=None, metavar="MIB")
    run.add_argument("--vcpus", type=int, default=None)
    run.add_argument("--engine", default="auto", choices=["auto", "native", "qemu"])
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    run.add_argument("--image", metavar="REF",
                     help="boot the OCI image REF (e.g. python:3.12-slim) instead of the "
                          "busybox guest; its Env, WorkingDir and User apply")
    run.add_argument("--pull", choices=["missing", "always", "never"], default="missing",
                     help="with --image: when to ask the registry (default: missing)")
    run.add_argument("--interpreter", metavar="PROGRAM",
                     help="run SCRIPT with this guest program (e.g. python3), SCRIPT on its "
                          "stdin, as %%%%vm INTERPRETER does; default: /bin/sh -c SCRIPT")
    doctor = sub.add_parser("doctor", help="what this machine can run, and which engine auto picks")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    notebook = sub.add_parser("notebook", help="execute a notebook headless, printing its output")
    notebook.add_argument("path")
    notebook.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    notebook.add_argument("--write", action="store_true", help="save the outputs into the notebook")
    args = parser.parse_args(argv)
    handler = {"assets": cmd_assets, "run": cmd_run, "doctor": cmd_doctor,
               "notebook": cmd_notebook}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI prints one clear line, not a traceback
        from traitlets import TraitError

        from .errors import VmError
        if isinstance(exc, (VmError, TraitError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
