"""Native KVM core vs QEMU, same probe guest: start → first UART byte, idle host RSS per VM.

    cd benchmarks && ../.venv/bin/python bench_native.py [--runs 20] [--rss-runs 10]
        [--memory-mib 128] [--idle-seconds 1]

One probe ELF per measurement (``native/guest/probes``, built by ``native/build_native.py``),
booted unchanged by the native core and by ``qemu-system-x86_64 -M microvm -kernel``: the
probe carries a PVH entry (``pvh_entry.S``), which both take. ``uart`` prints a line at once
(first byte ``h``); ``idle`` prints one line, then halts with interrupts off.

1. **Start → first UART byte** (``uart``), ``--runs`` samples per variant, interleaved
   round by round, after one warm-up round that is not counted:

   * native, in process — ``NativeVm(...)`` (VM, RAM, ELF load) → the first byte in the core's
     console ring: what a Python process that already has the core loaded (the Jupyter
     server) pays per VM;
   * native, fresh process — spawn ``python`` that imports the core, starts the VM and copies
     the first console byte to its stdout; the parent times spawn → that byte on a pipe;
   * QEMU TCG and QEMU KVM — spawn QEMU (microvm, the project's QEMU machine, the same
     ``-accel``/``-cpu`` as the QEMU engine) → the first byte of its serial port
     (``chardev stdio``) on a pipe, read unbuffered; then kill it.

2. **Idle host RSS per VM** (``idle``, ``--memory-mib`` of guest RAM for every VM),
   ``--rss-runs`` samples per variant, interleaved; each VM idles ``--idle-seconds`` after
   its line before VmRSS is read:

   * native — the core runs inside the host process, so a fresh Python process per sample
     reads its own VmRSS with the core loaded, after one idle VM, and after a second one:
     the deltas are what a VM costs (the first pays for core code paged in on first use);
   * QEMU — VmRSS of the QEMU process (one process per VM). RssAnon rows show how much of
     it is private anonymous memory (the rest is mostly shared library pages).

Prints the machine, the VM setup, Markdown tables ready for the README and the ratios
(QEMU / native), all from this one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, row, table_header

from supermachine_jupyter.engines import native
from supermachine_jupyter.engines.qemu.engine import accel_args, qemu_binary

ROOT = Path(__file__).resolve().parent.parent
FIRST_BYTE_PROBE = "uart"
FIRST_BYTE = b"h"                   # "hello from the uart probe"
IDLE_PROBE = "idle"
IDLE_READY = b"PROBE idle READY"
TIMEOUT_S = 60.0
POLL_S = 0.0002                     # console ring polling interval (native, in process)
KIB = 1024
MIB = 1024 * 1024
ACCELS = ("tcg", "kvm")
#: probe name -> private copy of its ELF for this run (see snapshot_guests)
GUESTS: dict[str, Path] = {}

#: Fresh-process native VM: loads the core, starts the probe, copies the first console byte to
#: stdout (so the parent times it exactly like QEMU's serial output).
NATIVE_FIRST_BYTE_CHILD = r"""
import os, sys, time
from supermachine_jupyter.engines import native
probe, memory_mib = sys.argv[1], int(sys.argv[2])
poll_s, timeout_s = float(sys.argv[3]), float(sys.argv[4])
ffi, lib = native.library()
vm = native.NativeVm(probe, memory_mib=memory_mib, strict_unhandled_exits=True)
vm.start()
deadline = time.monotonic() + timeout_s
while lib.sm_vm_console_total(vm._handle()) == 0:
    if time.monotonic() > deadline or vm.state in ("stopped", "failed"):
        sys.exit("no UART output: " + vm.console_output().decode(errors="replace"))
    time.sleep(poll_s)
os.write(1, vm.console_output()[:1])
vm.close()
"""

#: Fresh-process native RSS: VmRSS/RssAnon with the core loaded, after one idle VM, after two.
NATIVE_RSS_CHILD = r"""
import json, sys, time
from supermachine_jupyter.engines import native
probe, memory_mib, idle_s, ready, timeout_s = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                               sys.argv[4].encode(), float(sys.argv[5]))

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}

ok, why = native.kvm_check()          # core loaded, /dev/kvm opened once
if not ok:
    sys.exit(why)
samples = [status()]
vms = []
for _ in range(2):
    vm = native.NativeVm(probe, memory_mib=memory_mib, strict_unhandled_exits=True)
    vm.start()
    out = vm.wait_for_console(ready, timeout_s)
    if ready not in out:
        sys.exit("idle probe did not report: " + out.decode(errors="replace"))
    vms.append(vm)
    time.sleep(idle_s)
    if vm.state != "running":
        sys.exit("idle VM is " + vm.state)
    samples.append(status())
print(json.dumps({"samples": samples, "guest_resident": [v.guest_resident_bytes() for v in vms]}))
for vm in vms:
    vm.close()
"""


def snapshot_guests(directory: str) -> None:
    """Copy the probe ELFs once, so every engine boots the very same bytes all run long (the
    native tests rebuild the probes when their sources change, possibly mid-run)."""
    for name in (FIRST_BYTE_PROBE, IDLE_PROBE):
        GUESTS[name] = Path(shutil.copy2(native.probe_path(name), directory))


def guest(name: str) -> Path:
    return GUESTS[name]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def read_until(proc: subprocess.Popen, needle: bytes, timeout: float, what: str) -> bytes:
    """Read proc's stdout (unbuffered pipe) until needle appears; the bytes read so far."""
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        chunk = os.read(fd, 1 if len(needle) == 1 else 4096) if ready else b""
        if not chunk:
            proc.kill()
            _, err = proc.communicate()
            raise RuntimeError(f"{what}: no {needle!r} within {timeout:.0f} s "
                               f"(stdout {got[-300:]!r}, stderr {err[-500:]!r})")
        got += chunk
    return got


def spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, env=env)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()


def proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * KIB for k in ("VmRSS", "RssAnon")}


def qemu_cmd(accel: str, probe: Path, memory_mib: int) -> list[str]:
    return [qemu_binary(), "-M", "microvm,acpi=off", *accel_args(accel), "-m", str(memory_mib),
            "-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", str(probe), "-chardev", "stdio,id=console,signal=off",
            "-serial", "chardev:console"]


# -- start → first UART byte ---------------------------------------------------------------
def native_in_process_first_byte(memory_mib: int) -> float:
    _ffi, lib = native.library()
    started = time.perf_counter()
    vm = native.NativeVm(guest(FIRST_BYTE_PROBE), memory_mib=memory_mib,
                         strict_unhandled_exits=True)
    try:
        vm.start()
        deadline = time.monotonic() + TIMEOUT_S
        while lib.sm_vm_console_total(vm._handle()) == 0:
            if time.monotonic() > deadline or vm.state in ("stopped", "failed"):
                raise RuntimeError(f"native: no UART output: {vm.console_output()!r}")
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        first = vm.console_output()[:1]
    finally:
        vm.close()
    if first != FIRST_BYTE:
        raise RuntimeError(f"native: first UART byte {first!r}, expected {FIRST_BYTE!r}")
    return elapsed


def native_fresh_process_first_byte(memory_mib: int) -> float:
    cmd = [sys.executable, "-c", NATIVE_FIRST_BYTE_CHILD, str(guest(FIRST_BYTE_PROBE)),
           str(memory_mib), str(POLL_S), str(TIMEOUT_S)]
    env = child_env()
    started = time.perf_counter()
    proc = spawn(cmd, env)
    first = read_until(proc, FIRST_BYTE[:1], TIMEOUT_S, "native (fresh process)")
    elapsed = time.perf_counter() - started
    _, err = proc.communicate(timeout=TIMEOUT_S)
    if proc.returncode != 0 or first != FIRST_BYTE:
        raise RuntimeError(f"native (fresh process): first byte {first!r}, rc {proc.returncode}, "
                           f"stderr {err[-500:]!r}")
    return elapsed


def qemu_first_byte(accel: str, memory_mib: int) -> float:
    cmd = qemu_cmd(accel, guest(FIRST_BYTE_PROBE), memory_mib)
    started = time.perf_counter()
    proc = spawn(cmd)
    try:
        first = read_until(proc, FIRST_BYTE[:1], TIMEOUT_S, f"QEMU {accel}")
        elapsed = time.perf_counter() - started
    finally:
        kill(proc)
    if first != FIRST_BYTE:
        raise RuntimeError(f"QEMU {accel}: first serial byte {first!r}, expected {FIRST_BYTE!r}")
    return elapsed


# -- idle host RSS -------------------------------------------------------------------------
def native_rss(memory_mib: int, idle_s: float) -> dict:
    cmd = [sys.executable, "-c", NATIVE_RSS_CHILD, str(guest(IDLE_PROBE)), str(memory_mib),
           str(idle_s), IDLE_READY.decode(), str(TIMEOUT_S)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(),
                          timeout=TIMEOUT_S + 4 * idle_s)
    if proc.returncode != 0:
        raise RuntimeError(f"native RSS child failed: {proc.stderr[-800:]}")
    data = json.loads(proc.stdout)
    base, one, two = data["samples"]
    return {"first_rss": one["VmRSS"] - base["VmRSS"],
            "first_anon": one["RssAnon"] - base["RssAnon"],
            "second_rss": two["VmRSS"] - one["VmRSS"], "process_rss": one["VmRSS"],
            "guest_resident": data["guest_resident"][0]}


def qemu_rss(accel: str, memory_mib: int, idle_s: float) -> dict:
    proc = spawn(qemu_cmd(accel, guest(IDLE_PROBE), memory_mib))
    try:
        read_until(proc, IDLE_READY, TIMEOUT_S, f"QEMU {accel} idle probe")
        time.sleep(idle_s)
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU {accel} ended while idle (rc {proc.returncode})")
        status = proc_status(proc.pid)
    finally:
        kill(proc)
    return {"rss": status["VmRSS"], "anon": status["RssAnon"]}


# -- output --------------------------------------------------------------------------------
def fmt_mib(value: float) -> str:
    if abs(value) < MIB:
        return f"{value / KIB:.0f} KiB"
    return f"{value / MIB:.1f} MiB"


def rss_row(name: str, samples: list[float]) -> str:
    return (f"| {name} | {len(samples)} | {fmt_mib(statistics.median(samples))} | "
            f"{fmt_mib(min(samples))} | {fmt_mib(max(samples))} |")


def ratio(numerator: list[float], denominator: list[float]) -> str:
    den = statistics.median(denominator)
    if den <= 0:
        return "n/a (native median is 0)"
    return f"{statistics.median(numerator) / den:.1f}×"


def probe_line(name: str) -> str:
    path = guest(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"`{path.name}` ({path.stat().st_size} bytes, sha256 {digest}…)"


def progress(text: str) -> None:
    print(f"\r{text}", end="", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20,
                        help="first-byte samples per variant (default 20)")
    parser.add_argument("--rss-runs", type=int, default=10,
                        help="idle-RSS samples per variant (default 10)")
    parser.add_argument("--memory-mib", type=int, default=128,
                        help="guest RAM of every VM (default 128)")
    parser.add_argument("--idle-seconds", type=float, default=1.0,
                        help="idle time before reading VmRSS (default 1)")
    args = parser.parse_args()

    if qemu_binary() is None:
        print("qemu-system-x86_64 not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1
    ok, why = native.kvm_check()
    if not ok:
        print(f"the native core cannot use /dev/kvm here: {why}", file=sys.stderr)
        return 1
    mib = args.memory_mib
    speed = native.calibrate()
    with tempfile.TemporaryDirectory(prefix="bench-native-") as directory:
        snapshot_guests(directory)
        return run(args, mib, speed)


def run(args: argparse.Namespace, mib: int, speed: dict) -> int:
    """Measure (interleaved), then print the report."""
    first_byte = {
        "native, in process (NativeVm → console ring)": lambda: native_in_process_first_byte(mib),
        "native, fresh process (spawn python → pipe)":
            lambda: native_fresh_process_first_byte(mib),
        "QEMU TCG, microvm (spawn → serial pipe)": lambda: qemu_first_byte("tcg", mib),
        "QEMU KVM, microvm (spawn → serial pipe)": lambda: qemu_first_byte("kvm", mib),
    }
    times: dict[str, list[float]] = {name: [] for name in first_byte}
    for fn in first_byte.values():                      # warm-up: page cache, not counted
        fn()
    for i in range(args.runs):
        for name, fn in first_byte.items():
            times[name].append(fn())
        progress(f"first byte: round {i + 1}/{args.runs}")
    print(file=sys.stderr)

    native_samples: list[dict] = []
    qemu_samples: dict[str, list[dict]] = {accel: [] for accel in ACCELS}
    for i in range(args.rss_runs):
        native_samples.append(native_rss(mib, args.idle_seconds))
        for accel in ACCELS:
            qemu_samples[accel].append(qemu_rss(accel, mib, args.idle_seconds))
        progress(f"idle RSS: round {i + 1}/{args.rss_runs}")
    print(file=sys.stderr)

    names = list(first_byte)
    native_in, native_fresh, tcg, kvm = (times[n] for n in names)
    native_first = [s["first_rss"] for s in native_samples]
    native_process = [s["process_rss"] for s in native_samples]
    qemu_rss_of = {accel: [s["rss"] for s in qemu_samples[accel]] for accel in ACCELS}

    print(machine_line())
    print(f"KVM here: {speed['speed']} (calib probe: guest/host cycle ratio {speed['ratio']:.0f}). "
          f"VMs: 1 vCPU, {mib} MiB guest RAM; QEMU -M microvm, "
          f"TCG `{' '.join(accel_args('tcg'))}`, KVM `{' '.join(accel_args('kvm'))}`.")
    print(f"Guests, the same ELF under both engines (PVH entry; copied once for this run): "
          f"first byte {probe_line(FIRST_BYTE_PROBE)}, idle {probe_line(IDLE_PROBE)}.")
    print()
    print(f"Start → first UART byte ({args.runs} runs each, interleaved, "
          "after one warm-up round):")
    print()
    print(table_header())
    for name in names:
        print(row(name, times[name]))
    print()
    print(f"Idle host RSS per VM ({args.rss_runs} runs each, interleaved; VmRSS "
          f"{args.idle_seconds:g} s after the idle probe's line):")
    print()
    print(table_header())
    print(rss_row("native: one VM, Δ VmRSS of its Python process", native_first))
    print(rss_row("native: a second VM in that process, Δ VmRSS",
                  [s["second_rss"] for s in native_samples]))
    print(rss_row("native: whole Python process with one VM (interpreter + core + VM)",
                  native_process))
    print(rss_row("native: one VM, Δ RssAnon", [s["first_anon"] for s in native_samples]))
    print(rss_row("native: guest RAM resident (core's count)",
                  [s["guest_resident"] for s in native_samples]))
    for accel in ACCELS:
        print(rss_row(f"QEMU {accel.upper()}: VmRSS of the QEMU process", qemu_rss_of[accel]))
    for accel in ACCELS:
        print(rss_row(f"QEMU {accel.upper()}: RssAnon of the QEMU process",
                      [s["anon"] for s in qemu_samples[accel]]))
    print()
    print("Ratios, QEMU median / native median (this run; > 1: native is faster / smaller):")
    print()
    print(f"- start → first UART byte, vs native in process: QEMU TCG {ratio(tcg, native_in)}, "
          f"QEMU KVM {ratio(kvm, native_in)}")
    print(f"- start → first UART byte, vs native fresh process: "
          f"QEMU TCG {ratio(tcg, native_fresh)}, QEMU KVM {ratio(kvm, native_fresh)}")
    print(f"- idle host RSS per VM, vs native Δ of one VM: "
          f"QEMU TCG {ratio(qemu_rss_of['tcg'], native_first)}, "
          f"QEMU KVM {ratio(qemu_rss_of['kvm'], native_first)}")
    print(f"- idle host RSS per VM, vs the whole native Python process with one VM: "
          f"QEMU TCG {ratio(qemu_rss_of['tcg'], native_process)}, "
          f"QEMU KVM {ratio(qemu_rss_of['kvm'], native_process)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
