"""Snapshot benchmark: cold boot vs restore, to the first byte of exec output; host memory.

    python benchmarks/bench_snapshot.py [--runs 5] [--vms 5] [--memory 256] [--no-plain]
                                        [--engines qemu,native] [--working-set 64]

In one run, for each engine (QEMU, then the native core):

1. **Time to first output**: ``--runs`` times each (after one warm-up boot), from the call
   that starts the VM to the first stdout byte of ``echo hi`` in it —
   cold boot (``Image.start``) vs restore (``Image.from_snapshot(p).start``, which includes
   the header and digest checks, the engine loading the state, the agent's HELLO and the
   guest refresh: hostname, entropy, clock). Also the ``%%vm`` path, the image's
   snapshot cache (``Image.start(..., snapshot_cache=True)``) from empty: its first start
   (a boot plus the snapshot's pause) and the later ones (restores); how long
   ``Vm.snapshot`` takes and how long the source guest stays paused.
2. **Host memory of ``--vms`` VMs** running at once, each having run ``echo hi``: RSS, PSS
   (shared pages divided among the mappings that share them) and anonymous memory
   (``/proc/PID/smaps_rollup``) — cold-booted VMs vs VMs restored from one snapshot.
   Restores map the snapshot's RAM file copy-on-write (QEMU ``share=off``, the core's
   ``MAP_PRIVATE``), so RSS counts the shared file pages once per VM while PSS counts them
   once in total. Unless ``--no-plain``, also VMs restored from a plain QEMU migration
   stream (the whole RAM in the stream, loaded into anonymous memory), for comparison.

The guest: the default image (Linux) wherever the engine runs it. Where the native core
cannot run Linux (an emulated KVM, as on this workplace: see ``doctor``), its section runs
the ``agent`` probe guest instead — a freestanding guest that speaks the same agent protocol
over the same vsock device, so the host side (Image, Vm, snapshot files, the core's restore,
the agent's HELLO) is the one measured, but the guest is not Linux. Its working set is
``--working-set`` MiB written by the guest (the ``touch`` built-in) before the snapshot and
in every cold VM, standing in for a booted kernel's resident memory. Native VMs run inside
this process, so their memory is this process's growth while they run.

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


def start_group(start, count: int) -> tuple[list, dict]:
    """``count`` VMs from ``start(i)``, each having run ``echo hi``, and the host memory they
    take: the sum over their engine processes, or (in-process engines) this process's
    growth while they run."""
    import os
    before = memory([os.getpid()])
    vms = []
    try:
        for i in range(count):
            vms.append(start(i))
            assert vms[-1].run("echo hi").stdout == "hi\n"
        time.sleep(1.0)
        pids = [pid for vm in vms for pid in vm.instance.process_ids()]
        if pids:
            return vms, memory(pids)
        after = memory([os.getpid()])
        return vms, {key: after[key] - before[key] for key in after}
    except BaseException:
        for vm in vms:
            vm.stop()
        raise


def plain_restores(image: Image, config: VmConfig, count: int, work: Path) -> tuple[list, dict]:
    """``count`` QEMUs restored from one plain migration stream (RAM inside the stream, loaded
    into anonymous memory): the comparison for copy-on-write restores. Bench-only code: it
    launches QEMU by hand with the cold VM's command line plus ``-incoming``."""
    import socket

    from supermachine_jupyter.guest.agent import AgentClient
    from supermachine_jupyter.engines.qemu.engine import wait_for_migration
    from supermachine_jupyter.engines.process import spawn_owned, terminate
    from supermachine_jupyter.engines.qemu.qmp import connect_when_ready

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


def engine_guest(engine: str, args) -> tuple[Image, VmConfig, str, str]:
    """The image, config and guest description for one engine, and the command that builds
    the guest's working set before a snapshot ('' for none)."""
    from supermachine_jupyter.engines import choose_engine
    config = VmConfig(engine=engine, memory_mib=args.memory)
    if engine == "qemu" or choose_engine("auto").name == "native":
        return Image.default(), config, "default image (Linux)", ""
    from supermachine_jupyter.engines.native import probe_path
    probe = probe_path("agent")
    image = Image(probe, probe, probe, description="agent probe guest")
    return (image, config, f"agent probe guest, {args.working_set} MiB working set",
            f"touch {args.working_set}" if args.working_set else "")


def bench_engine(engine: str, args, work: Path) -> dict:
    """Cold boot vs restore to first output, snapshot cost, and the memory of ``--vms`` VMs
    cold vs restored, on one engine."""
    image, config, guest, working_set = engine_guest(engine, args)

    def cold_start(name: str):
        vm = image.start(config, name=name)
        if working_set:
            assert vm.run(working_set).ok
        return vm

    out: dict = {"guest": guest}
    with image.start(config, name=f"{engine}-warmup") as vm:     # warm caches, not counted
        out["engine"], out["accel"] = vm.engine, vm.accel
    cold = []
    for i in range(args.runs):
        seconds, vm = start_to_first_output(lambda i=i: image.start(config, name=f"cold{i}"))
        cold.append(seconds)
        vm.stop()
    snap_times, paused = [], []
    for i in range(max(3, args.runs // 2)):
        with cold_start("snapsrc") as vm:
            began = time.monotonic()
            snap = vm.snapshot(work / f"{engine}-snap{i}")
            snap_times.append(time.monotonic() - began)
            paused.append(snap.header["engine_state"]["paused_seconds"])
    snap_image = Image.from_snapshot(snap.path)
    stats = {name: (snap.path / name).stat() for name in snap.header["files"]}
    out["on_disk"] = {name: (st.st_size, st.st_blocks * 512) for name, st in stats.items()}
    restored, stages = [], []
    with snap_image.start(name="rwarm"):               # page cache of the snapshot files
        pass
    for i in range(args.runs):
        seconds, vm = start_to_first_output(lambda i=i: snap_image.start(name=f"restore{i}"))
        restored.append(seconds)
        stages.append(vm.restore_timings)
        vm.stop()
    groups = []
    for label, start in ((f"{args.vms} cold-booted VMs", lambda i: cold_start(f"coldmem{i}")),
                         (f"{args.vms} VMs restored from one snapshot",
                          lambda i: snap_image.start(name=f"restmem{i}"))):
        vms, mem = start_group(start, args.vms)
        for vm in vms:
            vm.stop()
        groups.append((label, mem))
    out.update(cold=cold, restored=restored, snap_times=snap_times, paused=paused,
               stages=stages, groups=groups, image=image, config=config)
    return out


def cache_runs(result: dict, args, work: Path) -> None:
    """The %%vm path: the image's pre-booted snapshot cache, from empty; its first start (a
    boot plus the snapshot's pause) and the later ones (restores)."""
    image, config = result["image"], result["config"]
    from supermachine_jupyter.snapshots import cache, store
    cache_dir = work / f"{result['engine']}-cache"
    cache_dir.mkdir()
    store.snapshots_dir = lambda: cache_dir
    seconds, vm = start_to_first_output(
        lambda: image.start(config, name="cache0", snapshot_cache=True))
    result["cache_first"] = [seconds]
    vm.stop()
    cache.wait_for_background(60)
    result["cache_later"] = []
    for i in range(args.runs):
        seconds, vm = start_to_first_output(
            lambda i=i: image.start(config, name=f"cache{i + 1}", snapshot_cache=True))
        assert vm.restored_from is not None
        result["cache_later"].append(seconds)
        vm.stop()


def plain_runs(result: dict, args, work: Path) -> None:
    """QEMU only: restores from a plain migration stream, for comparison."""
    result["plain"], mem = plain_restores(result["image"], result["config"], args.vms, work)
    result["groups"].append((f"{args.vms} VMs restored from a plain migration stream", mem))


def report(results: dict, args) -> None:
    print_report_head("VMs: " + "; ".join(
        f"{r['engine']}/{r['accel']} ({r['guest']})" for r in results.values())
        + f", {args.memory} MiB, 1 vCPU")
    for r in results.values():
        tag = f"{r['engine']}/{r['accel']}:"
        print(row(f"{tag} cold boot → first exec output", r["cold"]))
        print(row(f"{tag} restore → first exec output", r["restored"]))
        if r.get("plain"):
            print(row(f"{tag} plain-stream restore → first exec output (no checks, no "
                      "refresh)", r["plain"]))
        if "cache_first" in r:
            print(row(f"{tag} snapshot cache, first start (boot + snapshot pause) → first "
                      "output", r["cache_first"]))
            print(row(f"{tag} snapshot cache, later starts (restore) → first output",
                      r["cache_later"]))
        print(row(f"{tag} Vm.snapshot", r["snap_times"]))
        print(row(f"{tag}   of which the guest is paused", r["paused"]))
    print()
    for r in results.values():
        stages = r["stages"]
        print(f"{r['engine']} restore stages (median seconds from the start of the restore): "
              + ", ".join(f"{k} {fmt(statistics.median(s[k] for s in stages))}"
                          for k in stages[0]))
        print(f"{r['engine']} snapshot on disk: " + ", ".join(
            f"{name} {mib(apparent)} ({mib(used)} allocated)"
            for name, (apparent, used) in r["on_disk"].items()))
    print()
    print("| host memory | RSS | PSS | anonymous |")
    print("|---|---:|---:|---:|")
    for r in results.values():
        where = "QEMU processes, sum" if r["engine"] == "qemu" else "growth of this process"
        for name, mem in r["groups"]:
            print(f"| {r['engine']}: {name} ({where}) | {mib(mem['Rss'])} | {mib(mem['Pss'])} "
                  f"| {mib(mem['Anonymous'])} |")
    print()
    for r in results.values():
        speedup = statistics.median(r["cold"]) / statistics.median(r["restored"])
        print(f"{r['engine']}: restore reaches first output {speedup:.1f}× sooner than a cold "
              "boot (medians).")
    print(json.dumps({engine: {k: r.get(k) for k in ("cold", "restored", "plain", "cache_first",
                                                      "cache_later", "snap_times")}
                      | {"memory": dict(r["groups"])} for engine, r in results.items()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--engines", default="qemu,native",
                        help="comma-separated engines to measure, in order")
    parser.add_argument("--working-set", type=int, default=64, metavar="MIB",
                        help="MiB the native probe guest writes before snapshots / in cold VMs")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the plain-migration-stream comparison")
    args = parser.parse_args()

    results = {}
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    try:
        for engine in args.engines.split(","):
            results[engine] = bench_engine(engine, args, work)
            cache_runs(results[engine], args, work)
            if engine == "qemu" and not args.no_plain:
                plain_runs(results[engine], args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
