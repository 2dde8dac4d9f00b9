"""A hostile guest (DESIGN.md, "Trust model") against the host, with real guests under QEMU.

Root in the guest can speak on the agent's channel itself: ``native/guest/hostile/hostile.c``
(compiled here with ``musl-gcc -static``, copied into the guest) takes a copy of the agent's
descriptor of the virtio-serial port and sends forged HELLO and ERROR floods, output beyond
the credit window and malformed frames; it can also make the kernel panic. Ordinary commands
do the rest: huge output, big files, a FIFO, children that escape a timeout's kill.

Every test checks that the host process's memory stays bounded (peak VmRSS growth under a
stated limit, sampled from /proc/self/status), that calls return within their deadline, and
that ``vm.state``/``vm.failure`` tell the truth. Tests that leave the VM as they found it
share one; those that end their VM boot their own.
"""

from __future__ import annotations

import gc
import inspect
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from supermachine_jupyter.guest.agent import MAX_UNCLAIMED_ERRORS
from supermachine_jupyter.errors import VmError, VmStoppedError
from supermachine_jupyter.vm import DEFAULT_OUTPUT_LIMIT_BYTES, KILL_GRACE_SECONDS
from tests.helpers import engine_pids

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
HOSTILE_SOURCE = REPO / "native" / "guest" / "hostile" / "hostile.c"
AGENT_SOURCES = REPO / "native" / "guest" / "agent"   # hostile.c frames with the agent's protocol.c
GUEST_HOSTILE = "/tmp/hostile"
MIB = 1024 * 1024


# --- helpers ----------------------------------------------------------------------------------

def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


class RssWatch:
    """Samples this process's VmRSS every 10 ms while the block runs; ``growth_mib`` is the
    peak above the value at the start."""

    def __enter__(self) -> "RssWatch":
        gc.collect()
        self.base = self.peak = rss_kib()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        self.peak = max(self.peak, rss_kib())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="session")
def hostile_binary(tmp_path_factory) -> bytes:
    """hostile.c, built static for the guest."""
    compiler = shutil.which("musl-gcc")
    if compiler is None:
        pytest.fail("musl-gcc not found (apt-get install musl-tools; the guest agent needs it too)")
    out = tmp_path_factory.mktemp("hostile") / "hostile"
    subprocess.run([compiler, "-static", "-O2", "-Wall", "-Werror", "-I", str(AGENT_SOURCES),
                    "-o", str(out), str(HOSTILE_SOURCE), str(AGENT_SOURCES / "protocol.c")],
                   check=True)
    return out.read_bytes()


def install(vm, binary: bytes) -> str:
    vm.write_file(GUEST_HOSTILE, binary, mode=0o755)
    return GUEST_HOSTILE


@pytest.fixture(scope="module")
def vm(start_vm, hostile_binary):
    machine = start_vm()
    install(machine, hostile_binary)
    yield machine
    machine.stop()


def violation_noticed(victim, attacker, timeout: float = 30) -> VmError:
    """The error that wakes ``victim`` once the host has hung up on the attacker's frames."""
    try:
        victim.wait(timeout=timeout)
    except VmError as exc:
        return exc
    except TimeoutError:
        said = []
        while True:
            try:
                event = attacker.next_event(timeout=0.5)
            except (TimeoutError, VmError) as exc:
                said.append(exc)
                break
            said.append(event)
            if attacker.exit is not None:
                break
        pytest.fail(f"no protocol violation noticed in {timeout} s; the attacker: {said}")
    pytest.fail(f"the victim ended ({victim.exit}) and the channel is still up")


def assert_still_serves(vm) -> None:
    assert vm.state == "running" and vm.failure is None
    assert vm.ping() < 5
    assert vm.run("echo alive", timeout=10).stdout == "alive\n"


def assert_failed_with_engine_gone(vm, engine_pid: int, *phrases: str) -> None:
    assert vm.state == "failed", vm.state
    for phrase in phrases:
        assert phrase in vm.failure, vm.failure
    assert wait_until(lambda: engine_pid not in engine_pids(), 10), "the engine was left running"
    with pytest.raises(VmStoppedError, match="failed"):
        vm.run("true")
    vm.stop()                                    # still fine to call


# --- forged frames that the host must shrug off -----------------------------------------------

def test_forged_hello_flood_is_counted_not_kept(vm):
    client = vm.agent
    before = client.extra_hellos
    with RssWatch() as rss:
        started = time.monotonic()
        result = vm.run(f"{GUEST_HOSTILE} hello 200000", timeout=30)
        elapsed = time.monotonic() - started
    assert result.ok and "sent 200000 frames" in result.stdout, result
    assert client.extra_hellos - before == 200000
    assert rss.growth_mib < 16, f"host RSS grew {rss.growth_mib:.0f} MiB"
    assert elapsed < 20
    assert_still_serves(vm)


def test_forged_error_flood_keeps_a_bounded_list(vm):
    errors = vm.agent.unclaimed_errors
    dropped_before = errors.dropped
    with RssWatch() as rss:
        result = vm.run(f"{GUEST_HOSTILE} error 200000", timeout=30)
        vm.ping()                                  # every forged frame has been read
    assert result.ok and "sent 200000 frames" in result.stdout, result
    assert len(errors) <= MAX_UNCLAIMED_ERRORS
    assert errors.dropped - dropped_before >= 200000 - MAX_UNCLAIMED_ERRORS
    assert rss.growth_mib < 16, f"host RSS grew {rss.growth_mib:.0f} MiB"
    while len(errors):                             # the newest are the ones kept
        last = errors.get_nowait()
    assert last.message == "forged error 199999"
    assert_still_serves(vm)


# --- protocol violations: the host hangs up and says so ---------------------------------------

def test_output_beyond_the_credit_window_closes_the_channel(start_vm, hostile_binary):
    vm = start_vm()
    hostile = install(vm, hostile_binary)
    engine_pid = vm.instance.process_ids()[0]
    victim = vm.exec("sleep 60")
    assert victim.pid
    flood = 64 * MIB                               # the victim's window is 256 KiB
    with RssWatch() as rss:
        attacker = vm.exec(f"{hostile} flood {victim.stream_id} {flood}")
        started = time.monotonic()
        try:
            victim.wait(timeout=15)
            error = None
        except VmError as exc:
            error = exc
        except TimeoutError:
            # Seen once in ~25 runs: the attacker's writes to the port failed in the guest
            # before its flood got out (it exits 0 saying "channel write: …"), so nothing
            # reached the host to refuse. The property is about what the host does with the
            # flood, so the attack is made once more; a second miss fails below with what the
            # attacker said.
            started = time.monotonic()
            attacker = vm.exec(f"{hostile} flood {victim.stream_id} {flood}")
            error = violation_noticed(victim, attacker)
        if error is None:
            pytest.fail(f"the victim ended ({victim.exit}) and the channel is still up")
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"the violation was noticed after {elapsed:.1f} s"
    assert "broke the protocol" in str(error) and "beyond the credit" in str(error), error
    assert rss.growth_mib < 16, f"host RSS grew {rss.growth_mib:.0f} MiB: output was buffered"
    assert_failed_with_engine_gone(vm, engine_pid, "agent connection was lost",
                                   f"on stream {victim.stream_id} beyond the credit")


MALFORMED = [
    # (id, hostile's arguments for a victim stream id, what the failure says)
    ("garbage", lambda sid: "garbage", "malformed frame header"),
    ("EXIT of 3 bytes", lambda sid: f"frame 0x15 {sid} 010203", "is not i32 code, i32 signal"),
    ("ERROR whose string overruns", lambda sid: "frame 0x7f 0 01000000ff000000414243",
     "is not u32 code, str message"),
    ("a type agents never send", lambda sid: "frame 0x02 0 00", "which an agent never sends"),
    ("FILE_DATA on a command's stream", lambda sid: f"frame 0x22 {sid} 41",
     "which is a exec stream"),
]


@pytest.mark.parametrize("args, why", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frame_breaks_the_channel_and_fails_the_vm(start_vm, hostile_binary, args, why):
    vm = start_vm()
    hostile = install(vm, hostile_binary)
    engine_pid = vm.instance.process_ids()[0]
    victim = vm.exec("sleep 60")
    assert victim.pid
    with RssWatch() as rss:
        attacker = vm.exec(f"{hostile} {args(victim.stream_id)}")
        started = time.monotonic()
        error = violation_noticed(victim, attacker)
        assert why in str(error), error
        assert time.monotonic() - started < 10
        assert wait_until(lambda: vm.state == "failed", 5)
    assert rss.growth_mib < 16
    assert_failed_with_engine_gone(vm, engine_pid, "agent connection was lost",
                                   "broke the protocol", why)


# --- output and files the host must not hold in memory ----------------------------------------

def test_run_of_huge_output_streams_it_all_and_keeps_a_bounded_part(vm):
    size = 160 * MIB                               # one "line": zeros, no newline
    seen = [0]
    with RssWatch() as rss:
        started = time.monotonic()
        result = vm.run(f"dd if=/dev/zero bs=65536 count={size // 65536} 2>/dev/null",
                        on_stdout=lambda data: seen.__setitem__(0, seen[0] + len(data)),
                        timeout=60)
        elapsed = time.monotonic() - started
    assert result.ok, result
    assert seen[0] == size, "the callback must see every byte"
    assert len(result.stdout) == DEFAULT_OUTPUT_LIMIT_BYTES
    assert result.stdout_truncated and result.truncated and not result.stderr_truncated
    assert "stdout_truncated=True" in repr(result)
    assert rss.growth_mib < 64, f"host RSS grew {rss.growth_mib:.0f} MiB for {size // MIB} MiB"
    print(f"\n{size // MIB} MiB of output in {elapsed:.1f} s, host RSS +{rss.growth_mib:.0f} MiB")

    small = vm.run("echo 0123456789; echo abc >&2", max_output_bytes=4)
    assert (small.stdout, small.stderr, small.stdout_truncated, small.stderr_truncated) \
        == ("0123", "abc\n", True, False)


def test_read_file_over_max_bytes_fails_naming_path_and_limit(vm):
    assert inspect.signature(vm.read_file).parameters["max_bytes"].default == 64 * MIB
    vm.run("dd if=/dev/zero of=/tmp/big bs=1048576 count=8 2>/dev/null")
    try:
        with RssWatch() as rss:
            started = time.monotonic()
            with pytest.raises(VmError) as info:
                vm.read_file("/tmp/big", max_bytes=MIB)
            elapsed = time.monotonic() - started
        assert "/tmp/big" in str(info.value) and "max_bytes=1048576" in str(info.value)
        assert elapsed < 5 and rss.growth_mib < 16
        # Each refused read is given up in the agent too: more than its 64 streams' worth
        # of them leave it serving.
        for _ in range(70):
            with pytest.raises(VmError, match="larger than max_bytes=100"):
                vm.read_file("/tmp/big", max_bytes=100)
        assert len(vm.read_file("/tmp/big", max_bytes=8 * MIB)) == 8 * MIB
        assert_still_serves(vm)
    finally:
        vm.run("rm -f /tmp/big")


# --- timeouts whose command leaves children behind --------------------------------------------

ESCAPES = [
    ("escaped writer", "setsid sh -c 'while :; do echo x; sleep 0.1; done' & sleep 100"),
    # fork-bomb-like: many escaped writers, then an endless fork loop in the group
    ("fork loop", "i=0; while [ $i -lt 150 ]; do "
                  "setsid sh -c 'while :; do echo $$; sleep 0.05; done' & i=$((i+1)); done; "
                  "while :; do sleep 1 & done"),
]


@pytest.mark.parametrize("script", [e[1] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_run_timeout_returns_on_time_when_children_escape(vm, script):
    try:
        with RssWatch() as rss:
            started = time.monotonic()
            result = vm.run(script, timeout=1)
            elapsed = time.monotonic() - started
        assert result.timed_out, result
        # The agent answers the kill at once; KILL_GRACE_SECONDS bounds it if it did not.
        assert elapsed < 1 + 3 and KILL_GRACE_SECONDS < 3, f"run(timeout=1) took {elapsed:.1f} s"
        assert rss.growth_mib < 16
        assert_still_serves(vm)
        if "echo x" in script:
            # The agent closed its end of the command's pipes: the escaped writer dies of
            # SIGPIPE at its next echo.
            assert wait_until(lambda: "echo x" not in vm.run("ps -o args").stdout, 5)
    finally:
        vm.run("kill -9 -1", timeout=10)         # every process but PID 1 and this shell


def test_cli_run_timeout_with_an_escaped_child_exits_124_on_time(guest_image):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "supermachine_jupyter", "run", "--quiet",
                           "--engine", "qemu", "--timeout", "1",
                           "echo started; setsid sh -c 'while :; do echo x; sleep 0.1; done' & "
                           "sleep 100"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 124, proc.stderr
    assert proc.stdout.startswith("started\n")
    assert elapsed < 30, f"the CLI took {elapsed:.1f} s"


# --- the guest's end, told as it was ----------------------------------------------------------

PANIC = "the guest kernel panicked: System is deadlocked on memory"


def test_kernel_panic_is_reported_as_a_kernel_panic(start_vm, hostile_binary):
    vm = start_vm()
    hostile = install(vm, hostile_binary)
    engine_pid = vm.instance.process_ids()[0]
    with RssWatch() as rss:
        started = time.monotonic()
        with pytest.raises(VmError, match=f"ended while running the command: {PANIC}"):
            vm.run(f"exec {hostile} oom-panic", timeout=60)
        elapsed = time.monotonic() - started
    assert elapsed < 30
    assert rss.growth_mib < 16
    assert vm.wait_stopped(10) and vm.state == "failed"
    assert vm.failure == PANIC
    assert "Kernel panic - not syncing" in vm.console_output()
    assert wait_until(lambda: engine_pid not in engine_pids(), 10)


# Last: before the fix, the agent blocked on a FIFO for good and took the shared VM with it.
def test_read_file_of_a_fifo_or_device_fails_fast_and_the_agent_still_answers(vm):
    vm.run("rm -f /tmp/fifo; mkfifo /tmp/fifo")
    try:
        for path, kind in [("/tmp/fifo", "a FIFO"), ("/dev/zero", "a character device"),
                           ("/tmp", "a directory")]:
            started = time.monotonic()
            with pytest.raises(VmError, match=f"read {path}: {kind}, not a regular file"):
                vm.read_file(path, timeout=10)
            assert time.monotonic() - started < 2
            assert vm.ping() < 2
        # Writes never block on a FIFO either (nobody reads this one).
        with pytest.raises(VmError, match="write /tmp/fifo: a FIFO, not a regular file"):
            vm.write_file("/tmp/fifo", b"x")
        assert_still_serves(vm)
    finally:
        vm.run("rm -f /tmp/fifo")
