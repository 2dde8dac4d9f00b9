"""The Vm API over the QEMU engine: lifecycle, failures, no orphaned engine processes."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from supermachine_jupyter import Image, VmConfig
from supermachine_jupyter.guest.agent import Exit, Output
from supermachine_jupyter.config import AssetPaths
from supermachine_jupyter.errors import VmError, VmStoppedError
from tests.helpers import engine_pids

QEMU = VmConfig(engine="qemu")


@pytest.fixture(scope="module")
def image():
    return Image.default()


@pytest.fixture(scope="module")
def vm(image):
    with image.start(QEMU, name="api") as vm:
        yield vm


def test_repr_shows_name_engine_state_size(vm):
    text = repr(vm)
    for part in ("'api'", "engine=qemu/", "state=running", "memory=256MiB", "vcpus=1"):
        assert part in text
    assert vm.engine == "qemu" and vm.accel in ("tcg", "kvm") and vm.engine_reason


def test_run_result_fields(vm):
    r = vm.run("echo out; echo err >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == ("out\n", "err\n", 7, False)
    assert 0 < r.duration < 10


def test_run_env_cwd_stdin(vm):
    r = vm.run('echo "$GREETING $(pwd)"; cat', env={"GREETING": "hi"}, cwd="/tmp", stdin=b"in")
    assert r.stdout == "hi /tmp\nin"


def test_run_timeout_kills_group_and_vm_stays_usable(vm):
    r = vm.run("sleep 30 & sleep 31; echo never", timeout=1)
    assert r.timed_out and r.signal == signal.SIGKILL and "never" not in r.stdout
    assert "sleep 3" not in vm.run("ps").stdout   # the whole process group went
    assert vm.run("echo ok").stdout == "ok\n"


def test_exec_streams_events_in_order(vm):
    events = list(vm.exec("echo a; sleep 0.2; echo b >&2; exit 2"))
    assert events[:-1] == [Output("stdout", b"a\n"), Output("stderr", b"b\n")]
    assert events[-1] == Exit(2, None)


def test_exec_callbacks(vm):
    got = []
    status = vm.exec("printf x; printf y >&2").wait(on_stdout=got.append,
                                                   on_stderr=lambda d: got.append(b"E" + d))
    assert status.ok and got == [b"x", b"Ey"]


def test_console_output_has_boot_and_init(vm):
    console = vm.console_output()
    assert "Linux version 6.1" in console and "supermachine-init: ready" in console


def test_concurrent_threads_share_one_vm(vm):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: vm.run(f"echo {i}").stdout, range(24)))
    assert results == [f"{i}\n" for i in range(24)]


def test_memory_and_vcpus_reach_the_guest(image):
    with image.start(QEMU.with_memory_mib(192).with_vcpus(2)) as vm:
        out = vm.run("nproc; grep MemTotal /proc/meminfo").stdout.split()
    assert out[0] == "2"
    assert 150_000 < int(out[2]) <= 192 * 1024


def test_stop_is_idempotent_and_leaves_no_process(image):
    vm = image.start(QEMU)
    pids = vm.instance.process_ids()
    assert pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    vm.stop()
    vm.stop()
    assert vm.state == "stopped"
    assert not [p for p in pids if p in engine_pids()]
    with pytest.raises(VmStoppedError, match="stopped"):
        vm.run("true")


def test_killed_engine_is_reported_not_hung(image):
    vm = image.start(QEMU)
    proc = vm.exec("sleep 100")
    os.kill(vm.instance.process_ids()[0], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(VmError, match="signal 9"):
        proc.wait(timeout=20)
        vm.run("true")
    assert time.monotonic() - started < 5
    assert vm.wait_stopped(5) and vm.state == "failed" and "signal 9" in vm.failure
    with pytest.raises(VmStoppedError, match="failed"):
        vm.run("true")
    vm.stop()   # still fine to call


@pytest.mark.parametrize("how, why", [
    ("reboot -f", "the guest rebooted"),
    # The kernel prints its halt line and QEMU exits: whichever the host sees first.
    ("poweroff -f", "the guest (shut down|powered off|halted)"),
    ("halt -f", "the guest (shut down|powered off|halted)"),
    # A kernel that halts without ACPI only stops its CPUs (QEMU 7.2 microvm exits, other
    # engines may idle forever): the host must end the VM when the console says so. The
    # line is written by the guest here, as the kernel would.
    ("echo 'reboot: System halted' > /dev/console", "the guest halted"),
])
def test_guest_ending_itself_is_reported_not_hung(image, how, why):
    vm = image.start(QEMU)
    pid = vm.instance.process_ids()[0]
    started = time.monotonic()
    with pytest.raises(VmError, match=why):
        vm.run(f"sleep 0.2; {how}; sleep 30", timeout=30)
    assert time.monotonic() - started < 10
    assert vm.wait_stopped(10) and vm.state == "failed" and re.search(why, vm.failure)
    assert pid not in engine_pids()


def test_boot_failure_names_the_problem(image, tmp_path):
    bogus = tmp_path / "initrd"
    bogus.write_bytes(b"not an initramfs")
    config = QEMU.with_assets(AssetPaths(str(image.kernel), str(bogus)))
    before = set(engine_pids(parent=os.getpid()))
    started = time.monotonic()
    with pytest.raises(VmError, match="did not boot") as failure:
        image.start(config, boot_timeout=60)
    assert time.monotonic() - started < 60
    assert "last console lines" in str(failure.value)
    assert set(engine_pids(parent=os.getpid())) - before == set()


OWNER_SCRIPT = textwrap.dedent("""
    import sys, time
    from supermachine_jupyter import Image, VmConfig
    vm = Image.default().start(VmConfig(engine="qemu"))
    print(vm.instance.process_ids()[0], flush=True)
    time.sleep(600)
""")


def test_sigkilled_owner_leaves_no_engine_process():
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE,
                             text=True)
    qemu_pid = int(owner.stdout.readline())
    assert qemu_pid in engine_pids()
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 5
    while qemu_pid in engine_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_pid not in engine_pids(), "QEMU outlived its SIGKILLed owner"
