"""The native core boots our real Linux guest and runs it through the public API.

Runs inside the nested-KVM L1 (see conftest.py): there /dev/kvm is kvm_amd on an emulated SVM
CPU, so everything runs at TCG speed — the bounds below are generous and about behaviour
(concurrency, a timeout that fires), never performance. Tests that leave no trace share one
VM (``vm``): a boot costs ~15-30 s in L1.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from supermachine_jupyter import VmConfig
from supermachine_jupyter.errors import VmError

from tests.nested.helpers import (entries, large_mappings, new_since, start_native,
                                  threads_and_fds, wait_for)

pytestmark = pytest.mark.nested_kvm

NATIVE = VmConfig(engine="native")
MIB = 2**20
TMP = os.environ.get("TMPDIR", "/tmp")      # where VMs keep their sockets (vsock_mux_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("native-linux")


@pytest.fixture(scope="module")
def share(workdir):
    """A host folder mounted read-write (``/mnt/share``) and read-only (``/mnt/ro``)."""
    host = workdir / "share"
    host.mkdir()
    (host / "hello.txt").write_text("from the host\n")
    (host / "log.txt").write_text("one\n")
    return host


@pytest.fixture(scope="module")
def vm(image, workdir, share):
    """One native VM for the tests that leave no trace: 256 MiB, balloon, a volume on /data,
    the share mounted twice (rw and ro)."""
    config = (NATIVE.with_memory_mib(256).with_balloon()
              .with_volume(str(workdir / "data.img"), "/data", size_mib=64)
              .with_virtiofs(str(share), "share", "/mnt/share")
              .with_virtiofs(str(share), "roshare", "/mnt/ro", read_only=True))
    started = time.monotonic()
    machine = start_native(image, config, name="nested-shared")
    print(f"native boot to the agent: {time.monotonic() - started:.1f} s "
          f"(vm.boot_seconds {machine.boot_seconds:.1f} s)")
    yield machine
    machine.stop()


# -- the engine and the guest ------------------------------------------------------------

def test_native_engine_runs_uname_in_our_linux_guest(vm):
    assert (vm.engine, vm.accel) == ("native", "kvm"), repr(vm)
    result = vm.run("uname -a")
    assert result.ok, result
    assert result.stdout.startswith("Linux nested-shared "), result.stdout
    assert "x86_64" in result.stdout
    assert vm.state == "running"


def test_exit_codes_and_signals(vm):
    assert vm.run("true").exit_code == 0
    assert vm.run("exit 3").exit_code == 3
    result = vm.run("echo out; echo err >&2; exit 42")
    assert (result.exit_code, result.stdout, result.stderr) == (42, "out\n", "err\n")
    killed = vm.run("kill -TERM $$; sleep 5")
    assert killed.signal == signal.SIGTERM and killed.exit_code is None, killed
    killed = vm.run("kill -KILL $$")
    assert killed.signal == signal.SIGKILL, killed


def test_stdin_reaches_the_command(vm):
    assert vm.run("tr a-z A-Z", stdin=b"hello guest\n").stdout == "HELLO GUEST\n"
    data = os.urandom(256 * 1024)
    result = vm.run("md5sum | cut -d' ' -f1", stdin=data)
    import hashlib
    assert result.stdout.strip() == hashlib.md5(data).hexdigest(), result


def test_one_megabyte_of_output_arrives_whole_and_in_order(vm):
    result = vm.run("seq 1 200000")
    expected = "".join(f"{i}\n" for i in range(1, 200001))
    assert len(expected) > MIB
    assert result.ok and len(result.stdout) == len(expected)
    assert result.stdout == expected


def test_concurrent_execs_run_at_once(vm):
    started = time.monotonic()
    procs = [vm.exec(f"sleep 3; echo job{i}") for i in range(4)]
    outputs = []
    for proc in procs:
        out = bytearray()
        status = proc.wait(timeout=60, on_stdout=out.extend)
        outputs.append((status.code, out.decode()))
    elapsed = time.monotonic() - started
    assert outputs == [(0, f"job{i}\n") for i in range(4)]
    assert elapsed < 10, f"4 × sleep 3 took {elapsed:.1f} s: the execs did not run at once"


def test_concurrent_runs_from_threads(vm):
    results = {}

    def run(i):
        results[i] = vm.run(f"echo thread{i}; exit {i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: (r.exit_code, r.stdout) for i, r in results.items()} == \
        {i: (i, f"thread{i}\n") for i in range(6)}


def test_timeout_kills_the_command_and_the_vm_survives(vm):
    started = time.monotonic()
    result = vm.run("echo begin; sleep 60", timeout=2)
    assert result.timed_out and result.stdout == "begin\n", result
    assert time.monotonic() - started < 20
    assert vm.run("echo still-here").stdout == "still-here\n"


def test_guest_sees_the_configured_memory(vm):
    memtotal_kib = int(vm.run("grep MemTotal /proc/meminfo").stdout.split()[1])
    # 256 MiB less what the kernel keeps for itself (its image, reserved ranges).
    assert 200 * 1024 < memtotal_kib <= 256 * 1024, memtotal_kib


# -- balloon -----------------------------------------------------------------------------

def test_balloon_inflates_deflates_and_reports_guest_stats(vm):
    before = wait_for(lambda: (s := vm.balloon_stats()).total_memory is not None and s, 20)
    assert before, f"no guest statistics from the balloon: {vm.balloon_stats()}"
    assert (before.target_pages, before.actual_pages) == (0, 0), before
    assert 200 * MIB < before.total_memory <= 256 * MIB, before
    assert 0 < before.free_memory <= before.total_memory, before
    vm.set_balloon_target(64)
    inflated = wait_for(lambda: (s := vm.balloon_stats()).actual_pages >= 64 * 256 and s, 30)
    assert inflated, f"the balloon did not reach 64 MiB: {vm.balloon_stats()}"
    assert (inflated.target_mib, inflated.actual_mib) == (64, 64), inflated
    after = wait_for(lambda: (s := vm.balloon_stats()).available_memory is not None
                     and before.available_memory - s.available_memory > 48 * MIB and s, 20)
    assert after, f"the guest's available memory did not drop: {before} → {vm.balloon_stats()}"
    vm.set_balloon_target(0)
    assert wait_for(lambda: vm.balloon_stats().actual_pages == 0, 30), vm.balloon_stats()
    assert vm.run("echo ok").stdout == "ok\n"


# -- volume and virtio-fs on the shared VM ----------------------------------------------

def test_volume_is_a_writable_ext4_on_its_path(vm):
    mounts = vm.run("grep ' /data ' /proc/mounts").stdout
    assert " ext4 " in mounts and " rw" in mounts, mounts
    assert vm.run("echo kept > /data/file && sync && cat /data/file").stdout == "kept\n"


def test_virtio_fs_reads_host_files_and_creates_new_ones(vm, share):
    assert vm.run("cat /mnt/share/hello.txt").stdout == "from the host\n"
    before = vm.mounts()[0].counters
    result = vm.run("echo from the guest > /mnt/share/made-in-guest.txt "
                    "&& sync /mnt/share/made-in-guest.txt")
    assert result.ok, result
    assert (share / "made-in-guest.txt").read_text() == "from the guest\n"
    assert vm.run("echo two >> /mnt/share/log.txt && sync /mnt/share/log.txt").ok
    assert (share / "log.txt").read_text() == "one\ntwo\n"
    (share / "from-host-later.txt").write_text("late\n")
    assert vm.run("cat /mnt/share/from-host-later.txt").stdout == "late\n"
    after = vm.mounts()[0].counters
    assert after.ops > before.ops and after.bytes_written > before.bytes_written


def test_read_only_mount_refuses_writes(vm, share):
    assert vm.run("cat /mnt/ro/hello.txt").stdout == "from the host\n"
    assert vm.run("echo x > /mnt/ro/new.txt").exit_code != 0
    vm.run("mount -o remount,rw /mnt/ro")        # the host refuses even then
    assert vm.run("echo x > /mnt/ro/new2.txt").exit_code != 0
    assert not (share / "new.txt").exists() and not (share / "new2.txt").exists()


# -- volumes across VMs ------------------------------------------------------------------

def test_volume_persists_across_vms_and_read_only_refuses_writes(image, workdir):
    disk = workdir / "persist.img"
    with start_native(image, NATIVE.with_volume(str(disk), "/vol", size_mib=64)) as first:
        assert first.run("echo persisted > /vol/a && sync").ok
    assert disk.stat().st_blocks * 512 < 64 * MIB          # sparse on the host
    ro = NATIVE.with_volume(str(disk), "/vol", size_mib=64, read_only=True)
    with start_native(image, ro) as second:
        assert second.run("cat /vol/a").stdout == "persisted\n"
        refused = second.run("echo x > /vol/b")
        assert refused.exit_code != 0 and "Read-only" in refused.stderr, refused
        dev = second.run("basename $(grep ' /vol ' /proc/mounts | cut -d' ' -f1)").stdout.strip()
        assert second.run(f"cat /sys/block/{dev}/ro").stdout == "1\n", dev


# -- %%vm through IPython ------------------------------------------------------------------

def test_vm_cell_magic_with_the_native_engine(capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    try:
        shell.run_cell_magic("vm", "--engine native --name nk1", "uname -s; echo hi >&2; exit 0")
        out = capsys.readouterr()
        assert "Linux" in out.out and "hi" in out.err
        assert "[nk1 · native/kvm]" in out.out and "exit 0" in out.out, out.out
        shell.run_cell_magic("vm", "--name nk1 --quiet", "exit 5")
        assert shell._supermachine_magics.last_result.exit_code == 5
        table = repr(shell.run_line_magic("vm", "list"))
        assert "nk1" in table and "native/kvm" in table, table
    finally:
        shell.run_line_magic("vm", "stop --all")


# -- how a VM ends -------------------------------------------------------------------------


def test_stop_leaves_no_thread_fd_mapping_or_socket_behind(image):
    before, ram_before, tmp_before = threads_and_fds(), large_mappings(200 * MIB), entries(TMP)
    vm = start_native(image, NATIVE, name="nested-stop")
    assert vm.run("echo up").stdout == "up\n"
    assert large_mappings(200 * MIB) - ram_before, "no guest RAM mapping seen while running"
    assert entries(TMP) - tmp_before, f"no socket folder or socket of the VM in {TMP}"
    vm.stop()
    assert vm.state == "stopped"
    _assert_nothing_left(before, ram_before, tmp_before, "stop()")
    vm.stop()     # idempotent


def _assert_nothing_left(before, ram_before, tmp_before, after_what: str) -> None:
    assert wait_for(lambda: not new_since(before), 10), f"after {after_what}: {new_since(before)}"
    assert large_mappings(200 * MIB) <= ram_before, f"guest RAM still mapped after {after_what}"
    assert entries(TMP) <= tmp_before, \
        f"left in {TMP} after {after_what}: {sorted(entries(TMP) - tmp_before)}"


def _ended_by_guest(image, name: str, command: str):
    """A VM whose guest ran ``command`` (which ends it), once it has ended."""
    vm = start_native(image, NATIVE, name=name)
    try:
        vm.run(command, timeout=60)
    except VmError:
        pass            # the VM may end before the command's exit status arrives
    assert vm.wait_stopped(60), f"the VM still runs after the guest ran {command!r}: {vm!r}"
    print(f"{command!r} ended the VM: {vm.failure}")
    return vm


def test_guest_poweroff_ends_the_vm_with_a_clear_reason_and_stop_frees_all(image):
    before, ram_before, tmp_before = threads_and_fds(), large_mappings(200 * MIB), entries(TMP)
    vm = _ended_by_guest(image, "nested-poweroff", "poweroff -f")
    # Without ACPI the guest kernel turns a power-off into a halt ("reboot: System halted").
    assert vm.failure in ("the guest powered off", "the guest halted"), vm.failure
    with pytest.raises(VmError, match="powered off|halted"):
        vm.run("true")
    vm.stop()
    _assert_nothing_left(before, ram_before, tmp_before, "a guest poweroff and stop()")


def test_guest_reboot_is_named_as_a_reboot_and_its_end_frees_all(image):
    before, ram_before, tmp_before = threads_and_fds(), large_mappings(200 * MIB), entries(TMP)
    vm = _ended_by_guest(image, "nested-reboot", "reboot -f")
    try:
        # reboot=t: the kernel triple-faults on purpose; its console line says it was a reboot.
        assert vm.failure == "the guest rebooted", vm.failure
        # The watcher that noticed the end has released everything, before any stop().
        _assert_nothing_left(before, ram_before, tmp_before, "a guest reboot")
    finally:
        vm.stop()
    _assert_nothing_left(before, ram_before, tmp_before, "a guest reboot and stop()")


def test_kernel_panic_is_named_as_a_panic_and_stop_frees_all(image):
    before, ram_before, tmp_before = threads_and_fds(), large_mappings(200 * MIB), entries(TMP)
    # No sysrq in our guest kernel: an out-of-memory with panic_on_oom panics it.
    vm = _ended_by_guest(image, "nested-panic",
                         "echo 1 > /proc/sys/vm/panic_on_oom; "
                         "echo 1 > /proc/sys/vm/overcommit_memory; "
                         "dd if=/dev/zero of=/dev/null bs=512M count=1")
    try:
        assert "Kernel panic - not syncing" in vm.console_output()
        assert "panicked" in (vm.failure or ""), vm.failure
        assert "Out of memory" in vm.failure, vm.failure
    finally:
        vm.stop()
    _assert_nothing_left(before, ram_before, tmp_before, "a kernel panic and stop()")


def test_triple_fault_is_named_as_such_and_its_end_frees_all():
    """Linux cannot be made to triple-fault from user space here (no sysrq, no modules): the
    agent probe's ``triple`` does it (int3 with an empty IDT). On SVM, KVM has reset the vCPU
    before the exit reaches the core, so the message must not pass 0xfff0 off as the fault site."""
    from supermachine_jupyter import Image
    from supermachine_jupyter.engines.native import probe_path
    probe = probe_path("agent")
    image = Image(kernel=probe, vmlinux=probe, initrd=probe, default_memory_mib=256,
                  description="the agent probe")
    before, ram_before, tmp_before = threads_and_fds(), large_mappings(200 * MIB), entries(TMP)
    vm = image.start(NATIVE, name="nested-triple")
    assert vm.run("echo up").stdout == "up\n"
    with pytest.raises(VmError, match="triple"):
        vm.run("triple", timeout=60)
    assert vm.wait_stopped(60), vm
    print(f"a triple fault ended the VM: {vm.failure}")
    assert vm.failure.startswith("triple_fault: guest triple fault"), vm.failure
    assert "at RIP 0xfff0" not in vm.failure, vm.failure
    _assert_nothing_left(before, ram_before, tmp_before, "a triple fault")
    vm.stop()
    _assert_nothing_left(before, ram_before, tmp_before, "a triple fault and stop()")
