"""The native core vs QEMU ``-accel kvm``, with our Linux guest, where KVM runs Linux.

    python benchmarks/bench_kvm_engines.py [--runs 5] [--execs 50] [--memory 256]
    make bench-nested          # the same, inside the nested-KVM L1 (tools/nested_kvm.py)

In one run, ``--runs`` rounds; each round measures both engines, in alternating order (native
first in even rounds, QEMU first in odd ones), so drift on a noisy machine hits both alike:

* **cold boot → first output**: ``Image.default().start(config)`` → the first stdout byte of
  ``echo hi`` (the same function as ``bench_snapshot.py``);
* **guest time to /init**: the kernel's own printk stamp of ``Run /init`` in that boot's
  console (a probe waiting on a missing device shows up here, whatever the host's speed);
* **restore → first output**: ``Image.from_snapshot(p).start(config)`` of a snapshot taken
  once per engine before the rounds → the first byte of ``echo hi``;
* **warm exec round trip**: median of ``--execs`` ``vm.run("true")`` on the booted VM; for
  the native core also on a second VM booted with every virtio queue notify exiting to the
  core (``SUPERMACHINE_NATIVE_QUEUE_NOTIFY_EXITS=1``: no KVM ioeventfds, the fallback path),
  so one run shows what the ioeventfds gain;
* **host memory per VM**: RSS and PSS of the booted VM after ``echo hi`` (QEMU: its process;
  the native core runs in this process: this process's growth while the VM runs).

Prints the machine and a Markdown table with medians, the native/QEMU ratio and the issue's
targets. Inside L1 every figure runs at TCG speed: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_snapshot import first_output, start_group, start_to_first_output
from benchmarks.common import machine_line
from supermachine_jupyter import Image, VmConfig
from supermachine_jupyter.engines.native.binding import QUEUE_NOTIFY_EXITS_ENV

ENGINES = ("native", "qemu")
RUN_INIT = re.compile(r"\[\s*(\d+\.\d+)\] Run /init")


def guest_seconds_to_init(console: str) -> float | None:
    found = RUN_INIT.search(console)
    return float(found.group(1)) if found else None


VIRTIO_COUNTERS = ("queue_notifications", "doorbell_notifications", "interrupts_used_ring",
                   "register_reads", "register_writes")


def virtio_counters(vm) -> dict[str, int]:
    """The native core's transport counters summed over its devices ({} under QEMU)."""
    if vm.engine != "native":
        return {}
    totals = dict.fromkeys(VIRTIO_COUNTERS, 0)
    for device in vm.instance.vm.devices():
        for name in VIRTIO_COUNTERS:
            totals[name] += device["counters"].get(name, 0)
    return totals


def warm_exec_seconds(vm, execs: int) -> float:
    samples = []
    before = virtio_counters(vm)
    for _ in range(execs):
        began = time.monotonic()
        assert vm.run("true").ok
        samples.append(time.monotonic() - began)
    if before:   # where the native round trips' exits go: per exec, every virtio device
        after = virtio_counters(vm)
        print("  per exec: " + ", ".join(f"{name} {(after[name] - before[name]) / execs:.1f}"
                                         for name in VIRTIO_COUNTERS), flush=True)
    return statistics.median(samples)


WARM_EXEC_NOTIFY_EXITS = "warm exec, every queue notify exiting (ms)"


def warm_exec_with_notify_exits(config: VmConfig, execs: int) -> float:
    """The native warm exec on a VM without ioeventfds (the core's fallback path)."""
    os.environ[QUEUE_NOTIFY_EXITS_ENV] = "1"
    try:
        vm = Image.default().start(config)
    finally:
        del os.environ[QUEUE_NOTIFY_EXITS_ENV]
    try:
        return 1000 * warm_exec_seconds(vm, execs)
    finally:
        vm.stop()


def one_round(engine: str, config: VmConfig, snapshot: Path, execs: int) -> dict:
    figures = {}
    figures["cold boot → first output (s)"], vm = start_to_first_output(
        lambda: Image.default().start(config))
    try:
        figures["guest time to /init (s)"] = guest_seconds_to_init(vm.console_output())
        figures["warm exec round trip (ms)"] = 1000 * warm_exec_seconds(vm, execs)
    finally:
        vm.stop()
    if engine == "native":
        figures[WARM_EXEC_NOTIFY_EXITS] = warm_exec_with_notify_exits(config, execs)
    vms, memory = start_group(lambda _: Image.default().start(config), 1)
    for each in vms:
        each.stop()
    figures["host RSS per VM (MiB)"] = memory["Rss"] / 2**20
    figures["host PSS per VM (MiB)"] = memory["Pss"] / 2**20
    began = time.monotonic()
    restored = Image.from_snapshot(snapshot).start(config)
    try:
        figures["restore → first output (s)"] = first_output(restored) - began
    finally:
        restored.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    args = parser.parse_args()
    from supermachine_jupyter.engines.accel import kvm_status
    status = kvm_status()
    if not status.hardware:
        print(f"KVM here is {status.speed}: this benchmark needs a KVM that runs Linux "
              "(run it in L1: make bench-nested)", file=sys.stderr)
        return 2
    print(machine_line())
    print("Native core vs QEMU -accel kvm, the default image (our Linux guest)")
    configs = {e: VmConfig(engine=e, memory_mib=args.memory) for e in ENGINES}
    work = Path(tempfile.mkdtemp(prefix="bench-kvm-"))
    snapshots = {}
    for engine in ENGINES:
        with Image.default().start(configs[engine]) as vm:
            assert vm.run("echo ready").stdout == "ready\n"
            snapshots[engine] = work / engine
            vm.snapshot(snapshots[engine])
    samples: dict[str, dict[str, list[float]]] = {e: {} for e in ENGINES}
    for round_number in range(args.runs):
        order = ENGINES if round_number % 2 == 0 else ENGINES[::-1]
        for engine in order:
            figures = one_round(engine, configs[engine], snapshots[engine], args.execs)
            for name, value in figures.items():
                if value is not None:
                    samples[engine].setdefault(name, []).append(value)
            print(f"round {round_number + 1} {engine}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in figures.items() if v is not None), flush=True)
    report(samples, args)
    return 0


TARGETS = {
    "cold boot → first output (s)": "native ≤ 0.5× QEMU",
    "guest time to /init (s)": "no probe waits on a missing device",
    "restore → first output (s)": "native ≤ 0.1× its own cold boot",
    "warm exec round trip (ms)": "native ≤ 1.0× QEMU",
}


def report(samples: dict, args) -> None:
    print(f"\n{args.runs} rounds per engine (alternating order), medians; "
          f"{args.memory} MiB guest, {args.execs} execs per warm-exec sample.\n")
    print("| | native core | QEMU -accel kvm | native / QEMU | target |")
    print("|---|---|---|---|---|")
    for name in samples["native"].keys() | samples["qemu"].keys():
        native = statistics.median(samples["native"].get(name) or [float("nan")])
        if name not in samples["qemu"]:
            print(f"| {name} | {native:.3g} | — | — | |")
            continue
        qemu = statistics.median(samples["qemu"][name])
        print(f"| {name} | {native:.3g} | {qemu:.3g} | {native / qemu:.2f}× | "
              f"{TARGETS.get(name, '')} |")
    cold = statistics.median(samples["native"]["cold boot → first output (s)"])
    restore = statistics.median(samples["native"]["restore → first output (s)"])
    print(f"\nnative restore / native cold boot: {restore / cold:.3f}×")


if __name__ == "__main__":
    sys.exit(main())
