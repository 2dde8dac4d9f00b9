"""The magic's own cost: a ``%%vm`` cell vs the same exec through the raw agent client.

    python benchmarks/bench_magics.py [--runs 10] [--execs 30]

In one run, on one machine: a ``%%vm`` cell on a new VM until its first output line reaches
the notebook's stdout, booted and restored from the pre-booted snapshot; a warm named-VM cell round trip; and the same command through
``AgentClient.exec`` on that VM. The difference between the last two is what the magic adds
(argument parsing, output decoding and writing, the status line).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from contextlib import redirect_stdout

from common import fmt, print_report_head, row

from IPython.testing.globalipapp import start_ipython


class FirstLineClock(io.StringIO):
    """A stdout that notes when the first newline arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_line_at: float | None = None

    def write(self, text: str) -> int:
        if self.first_line_at is None and "\n" in text and "first" in text:
            self.first_line_at = time.perf_counter()
        return super().write(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="cold cells (default 10)")
    parser.add_argument("--execs", type=int, default=30, help="warm round trips (default 30)")
    args = parser.parse_args()

    ip = start_ipython()
    ip.run_line_magic("load_ext", "supermachine_jupyter")
    ip.run_line_magic("config", "VmMagics.default_engine = 'qemu'")
    ip.run_cell_magic("vm", "--quiet", "true")          # warm-up: assets, calibration cache

    def cold_cells(snapshot_cache: bool) -> list[float]:
        ip.run_line_magic("config", f"VmMagics.snapshot_cache = {snapshot_cache}")
        samples = []
        for i in range(args.runs):
            clock = FirstLineClock()
            started = time.perf_counter()
            with redirect_stdout(clock):
                ip.run_cell_magic("vm", "--quiet", "echo first; echo second")
            samples.append(clock.first_line_at - started)
            print(f"\rcold cell {i + 1}/{args.runs}: {samples[-1]:.2f} s", end="",
                  file=sys.stderr)
        print(file=sys.stderr)
        return samples

    booted = cold_cells(snapshot_cache=False)
    restored = cold_cells(snapshot_cache=True)

    with redirect_stdout(io.StringIO()):
        ip.run_cell_magic("vm", "--name bench --quiet", "true")
    vm = ip._supermachine_magics.vms["bench"]

    warm, raw = [], []
    for _ in range(args.execs):               # interleaved so both see the same machine noise
        started = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            ip.run_cell_magic("vm", "--name bench --quiet", "echo x")
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        vm.agent.exec(script="echo x").wait(timeout=30, on_stdout=lambda _: None)
        raw.append(time.perf_counter() - started)
    ip.run_line_magic("vm", "stop --all")

    print_report_head(f"VMs: engine {vm.engine}, accel {vm.accel}, {vm.memory_mib} MiB, "
                      f"{vm.vcpus} vCPU")
    print(row("new-VM `%%vm` cell → first output line (boot)", booted))
    print(row("new-VM `%%vm` cell → first output line (pre-booted snapshot)", restored))
    print(row("warm named-VM `%%vm` cell round trip", warm))
    print(row("same exec through the raw agent client", raw))
    print()
    print(f"magic overhead (median warm cell − median raw exec): "
          f"{fmt(statistics.median(warm) - statistics.median(raw))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
