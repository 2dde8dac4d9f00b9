"""What every benchmark shares: the machine line, timing and the Markdown table format."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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
    from supermachine_jupyter.engines.qemu.engine import qemu_binary
    binary = qemu_binary()
    if binary is None:
        return "not installed"
    first = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return first.splitlines()[0].replace("QEMU emulator version ", "") if first else "unknown"


def machine_line() -> str:
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"QEMU {qemu_version()}")


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


def table_header() -> str:
    return "| measurement | samples | median | min | max |\n|---|---:|---:|---:|---:|"


def print_report_head(vms_line: str) -> None:
    """What every report starts with: the machine, the VMs measured, the table header."""
    print(machine_line())
    print(vms_line)
    print()
    print(table_header())


def row(name: str, samples: list[float]) -> str:
    return (f"| {name} | {len(samples)} | {fmt(statistics.median(samples))} | "
            f"{fmt(min(samples))} | {fmt(max(samples))} |")
