"""Guest agent benchmark: VM launch to agent HELLO, exec round trip, ping RTT.

    python benchmarks/bench_agent.py [--runs 20] [--execs 50] [--pings 200] [--engine qemu]

Boots ``--runs`` VMs one after another (after one warm-up boot that is not counted) and
times each from engine launch to the agent's HELLO (``Vm.boot_seconds``). On one more VM it
times ``--execs`` round trips of ``true`` (argv mode, and through ``/bin/sh -c``) and
``--pings`` pings. Prints the machine and a Markdown table ready for the README.
"""

from __future__ import annotations

import argparse
import sys

from common import print_report_head, row, timed

from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.image import Image


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

    print_report_head(f"VMs: engine {engine}, accel {accel}, {warm.memory_mib} MiB, "
                      f"{warm.vcpus} vCPU, guest kernel {guest_kernel}")
    print(row("launch → agent HELLO", boots))
    print(row("exec `true` round trip (argv)", execs))
    print(row("exec `sh -c true` round trip", sh_execs))
    print(row("ping RTT", pings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
