"""Snapshot benchmark: cold boot vs restore, to the first byte of exec output; host memory.

    python benchmarks/bench_snapshot.py [--runs 5] [--vms 5] [--memory 256] [--no-plain]

In one run (QEMU engine; the native core has no snapshots yet):

1. **Time to first output**: ``--runs`` times each (after one warm-up boot), from the call
   that starts the VM to the first stdout byte of ``echo hi`` in it —
   cold boot (``Image.start``) vs restore (``Image.from_snapshot(p).start``, which includes
   the header and digest checks, QEMU start, loading the state, the agent's HELLO and the
   guest refresh: hostname, entropy, clock). Also the ``%%vm`` path, the default image's
   snapshot cache (``Image.start(..., snapshot_cache=True)``) from empty: its first start
   (a boot plus the snapshot's pause) and the later ones (restores); how long
   ``Vm.snapshot`` takes and how long the source guest stays paused.
2. **Host memory of ``--vms`` VMs** running at once, each having run ``echo hi``: the sum
   over their QEMU processes of RSS, PSS (shared pages divided among the processes that map
   them) and anonymous memory (``/proc/PID/smaps_rollup``) — cold-booted VMs vs VMs restored
   from one snapshot. Restores map the snapshot's RAM file copy-on-write (``share=off``),
   so RSS counts the shared file pages once per VM while PSS counts them once in total.
   Unless ``--no-plain``, also VMs restored from a plain QEMU migration stream (the whole
   RAM in the stream, loaded into anonymous memory), for comparison.

Prints the machine and Markdown tables ready for the README.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt, print_report_head, row
from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.image import Image


def first_output(vm) -> float:
    """Monotonic time at which the first stdout byte of ``echo hi`` arrives."""
    proc = vm.exec(argv=["echo", "hi"])
    got = None
    for event in proc:
        if got is None and getattr(event, "data", None):
            got = time.monotonic()
    assert got is not None, "no output from echo"
    return got


def start_to_first_output(start) -> tuple[float, object]:
    began = time.monotonic()
    vm = start()
    return first_output(vm) - began, vm


def memory(pids: list[int]) -> dict[str, int]:
    """Sum of RSS, PSS and anonymous memory (bytes) over processes."""
    total = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1]) * 1024
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def measure_group(name: str, vms: list, settle: float = 1.0) -> tuple[str, dict]:
    for vm in vms:
        assert vm.run("echo hi").stdout == "hi\n"
    time.sleep(settle)
    pids = [pid for vm in vms for pid in vm.instance.process_ids()]
    mem = memory(pids)
    return name, mem


def plain_restores(image: Image, config: VmConfig, count: int, work: Path) -> tuple[list, dict]:
    """``count`` QEMUs restored from one plain migration stream (RAM inside the stream, loaded
    into anonymous memory): the comparison for copy-on-write restores. Bench-only code: it
    launches QEMU by hand with the cold VM's command line plus ``-incoming``."""
    import socket

    from supermachine_jupyter.agent import AgentClient
    from supermachine_jupyter.engines.qemu import wait_for_migration
    from supermachine_jupyter.process import spawn_owned, terminate
    from supermachine_jupyter.qmp import connect_when_ready

    stream = work / "plain.migration"
    with image.start(config, name="plainsrc") as vm:
        qmp = vm.instance.qmp()
        qmp.execute("stop")
        qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(stream))}")
        wait_for_migration(qmp, time.monotonic() + 120, vm.instance.is_running, "saving")
        qmp.execute("cont")
        args, old_dir = list(vm.instance.args), str(vm._spec.run_dir)
    procs, times = [], []
    try:
        for i in range(count):
            run_dir = work / f"plain{i}"
            run_dir.mkdir()
            argv = [a.replace(old_dir, str(run_dir)) for a in args]
            argv += ["-incoming", f"exec:cat {shlex.quote(str(stream))}"]
            began = time.monotonic()
            proc = spawn_owned(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            procs.append(proc)
            q = connect_when_ready(str(run_dir / "qmp.sock"), time.monotonic() + 30,
                                   lambda proc=proc: proc.poll() is None)
            while q.execute("query-migrate").get("status") != "completed":
                time.sleep(0.003)
            q.execute("cont")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(run_dir / "agent.sock"))
            agent = AgentClient(sock, name=f"plain{i}")
            agent.handshake(timeout=30)
            out = agent.exec(["echo", "hi"])
            for event in out:
                if getattr(event, "data", None):
                    times.append(time.monotonic() - began)
                    break
            out.wait(timeout=10)
            q.close()
        time.sleep(1.0)
        mem = memory([p.pid for p in procs])
    finally:
        for proc in procs:
            terminate(proc, grace=1)
    return times, mem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the plain-migration-stream comparison")
    args = parser.parse_args()

    image = Image.default()
    config = VmConfig(engine="qemu", memory_mib=args.memory)
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    try:
        with image.start(config, name="warmup") as vm:     # warm caches, not counted
            engine, accel = vm.engine, vm.accel

        cold = []
        for i in range(args.runs):
            seconds, vm = start_to_first_output(lambda i=i: image.start(config, name=f"cold{i}"))
            cold.append(seconds)
            vm.stop()

        snap_times, paused = [], []
        for i in range(max(3, args.runs // 2)):
            with image.start(config, name="snapsrc") as vm:
                began = time.monotonic()
                snap = vm.snapshot(work / f"snap{i}")
                snap_times.append(time.monotonic() - began)
                paused.append(snap.header["engine_state"]["paused_seconds"])
        snap_image = Image.from_snapshot(snap.path)
        stats = {name: (snap.path / name).stat() for name in snap.header["files"]}
        on_disk = {name: (st.st_size, st.st_blocks * 512) for name, st in stats.items()}

        restored, stages = [], []
        with snap_image.start(name="rwarm"):               # page cache of the snapshot files
            pass
        for i in range(args.runs):
            seconds, vm = start_to_first_output(lambda i=i: snap_image.start(name=f"restore{i}"))
            restored.append(seconds)
            stages.append(vm.restore_timings)
            vm.stop()

        # The %%vm path: the default image's pre-booted snapshot cache, from empty.
        from supermachine_jupyter import snapshot as snapmod
        snapmod.snapshots_dir = lambda: work
        seconds, vm = start_to_first_output(
            lambda: image.start(config, name="cache0", snapshot_cache=True))
        cache_first = [seconds]
        vm.stop()
        snapmod.wait_for_background(60)
        cache_later = []
        for i in range(args.runs):
            seconds, vm = start_to_first_output(
                lambda i=i: image.start(config, name=f"cache{i + 1}", snapshot_cache=True))
            assert vm.restored_from is not None
            cache_later.append(seconds)
            vm.stop()

        groups = []
        vms = [image.start(config, name=f"coldmem{i}") for i in range(args.vms)]
        try:
            groups.append(measure_group(f"{args.vms} cold-booted VMs", vms))
        finally:
            for vm in vms:
                vm.stop()
        vms = [snap_image.start(name=f"restmem{i}") for i in range(args.vms)]
        try:
            groups.append(measure_group(f"{args.vms} VMs restored from one snapshot", vms))
        finally:
            for vm in vms:
                vm.stop()
        plain_times = []
        if not args.no_plain:
            plain_times, mem = plain_restores(image, config, args.vms, work)
            groups.append((f"{args.vms} VMs restored from a plain migration stream", mem))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_report_head(f"VMs: engine {engine}, accel {accel}, {args.memory} MiB, 1 vCPU")
    print(row("cold boot → first exec output", cold))
    print(row("restore → first exec output", restored))
    if plain_times:
        print(row("plain-stream restore → first exec output (no checks, no refresh)",
                  plain_times))
    print(row("snapshot cache, first start (boot + snapshot pause) → first output",
              cache_first))
    print(row("snapshot cache, later starts (restore) → first output", cache_later))
    print(row("Vm.snapshot (pause, save, convert)", snap_times))
    print(row("  of which the guest is paused", paused))
    print()
    keys = list(stages[0])
    print("Restore stages (median seconds from the start of the restore): "
          + ", ".join(f"{k} {fmt(statistics.median(s[k] for s in stages))}" for k in keys))
    print("Snapshot on disk: " + ", ".join(f"{name} {mib(apparent)} ({mib(used)} allocated)"
                                           for name, (apparent, used) in on_disk.items()))
    print()
    print("| host memory (QEMU processes, sum) | RSS | PSS | anonymous |")
    print("|---|---:|---:|---:|")
    for name, mem in groups:
        print(f"| {name} | {mib(mem['Rss'])} | {mib(mem['Pss'])} | {mib(mem['Anonymous'])} |")
    speedup = statistics.median(cold) / statistics.median(restored)
    print()
    print(f"Restore reaches first output {speedup:.1f}× sooner than a cold boot (medians).")
    print(json.dumps({"cold_s": cold, "restore_s": restored, "plain_s": plain_times,
                      "cache_first_s": cache_first, "cache_later_s": cache_later,
                      "snapshot_s": snap_times, "memory": dict(groups)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
