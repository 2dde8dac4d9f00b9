"""Guest agent benchmark: VM launch to agent HELLO, exec round trip, ping RTT.

    python benchmarks/bench_agent.py [--runs 20] [--execs 50] [--pings 200] [--engine qemu]

Boots ``--runs`` VMs one after another (after one warm-up boot that is not counted) and
times each from engine launch to the agent's HELLO (``Vm.boot_seconds``). On one more VM it
times ``--execs`` round trips of ``true`` (argv mode, and through ``/bin/sh -c``) and
``--pings`` pings. Prints the machine and a Markdown table ready for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supermachine_jupyter.config import VmConfig  # noqa: E402
from supermachine_jupyter.engines.qemu import qemu_binary  # noqa: E402
from supermachine_jupyter.image import Image  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def qemu_version() -> str:
    binary = qemu_binary()
    if binary is None:
        return "not installed"
    first = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return first.splitlines()[0].replace("QEMU emulator version ", "") if first else "unknown"


def timed(fn, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.2f} ms"


def row(name: str, samples: list[float]) -> str:
    return (f"| {name} | {len(samples)} | {fmt(statistics.median(samples))} | "
            f"{fmt(min(samples))} | {fmt(max(samples))} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="VM boots to time (default 20)")
    parser.add_argument("--execs", type=int, default=50, help="exec round trips (default 50)")
    parser.add_argument("--pings", type=int, default=200, help="pings (default 200)")
    parser.add_argument("--engine", default="qemu", help="engine: qemu, native or auto")
    args = parser.parse_args()

    image = Image.default(lambda line: print(f"[assets] {line}", file=sys.stderr))
    config = VmConfig(engine=args.engine)

    def boot_once():
        vm = image.start(config)
        vm.stop()
        return vm

    warm = boot_once()                                   # page cache, calibration: not counted
    boots = []
    for i in range(args.runs):
        boots.append(boot_once().boot_seconds)
        print(f"\rboot {i + 1}/{args.runs}: {boots[-1]:.2f} s", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)

    with image.start(config) as vm:
        agent = vm.agent

        def exec_true() -> None:
            assert agent.exec(["true"]).wait(timeout=30).ok

        def exec_sh_true() -> None:
            assert agent.exec(script="true").wait(timeout=30).ok

        for warmup in (exec_true, exec_sh_true, agent.ping):
            warmup()
        execs = timed(exec_true, args.execs)
        sh_execs = timed(exec_sh_true, args.execs)
        pings = timed(agent.ping, args.pings)
        engine, accel = vm.engine, vm.accel
        guest_kernel = vm.run("uname -r").stdout.strip()

    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
          f"QEMU {qemu_version()}")
    print(f"VMs: engine {engine}, accel {accel}, {warm.memory_mib} MiB, {warm.vcpus} vCPU, "
          f"guest kernel {guest_kernel}")
    print()
    print("| measurement | samples | median | min | max |")
    print("|---|---:|---:|---:|---:|")
    print(row("launch → agent HELLO", boots))
    print(row("exec `true` round trip (argv)", execs))
    print(row("exec `sh -c true` round trip", sh_execs))
    print(row("ping RTT", pings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
