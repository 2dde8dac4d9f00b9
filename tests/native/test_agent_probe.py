"""The agent probe (native/guest/probes/agent.c) under the native core, on real KVM.

A freestanding guest speaks the agent protocol, so the host stack that normally talks to the
Linux guest's agent runs here end to end where Linux cannot boot: ``AgentClient`` over the
hybrid vsock mux, then ``Image``/``Vm``, then the ``%%vm`` magic in a real IPython shell.
Nothing is mocked. The protocol-error cases are the real agent's (tests/test_agent_protocol.py).
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from supermachine_jupyter.guest.agent import (
    INITIAL_WINDOW_BYTES,
    MAX_PAYLOAD_BYTES,
    AgentClient,
    ErrorCode,
    FrameType,
    RemoteError,
    encode_frame,
    pack_str,
    u32,
)
from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.errors import VmError
from supermachine_jupyter.image import Image
from tests.test_agent_protocol import (
    MALFORMED,
    RAW_BASE,
    Tap,
    errors_after,
    raw_exec,
    run,
)

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 30
READY = b"supermachine-init: ready"
AGENT_PORT = 1024
HOSTNAME = "probe-test"
FILE_MAX_BYTES = 4096        # agent_files.h
FILES_MAX = 8


def start_agent(native, directory, memory_mib: int = 64):
    vm = native.NativeVm(native.probe_path("agent"), memory_mib=memory_mib,
                         vsock_uds_path=directory / "v.sock", strict_unhandled_exits=True,
                         cmdline=f"sm.agent=vsock:{AGENT_PORT} sm.hostname={HOSTNAME}")
    vm.start()
    assert READY in vm.wait_for_console(READY, TIMEOUT_S), vm.console_output()
    return vm


def mux_connect(vm) -> socket.socket:
    """The host half of the hybrid vsock: CONNECT, then OK once the guest accepted."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    sock.connect(vm.vsock_uds_path)
    sock.sendall(f"CONNECT {AGENT_PORT}\n".encode())
    reader = sock.makefile("rb")
    line = reader.readline()
    reader.close()
    assert line.startswith(b"OK "), line
    sock.settimeout(None)
    return sock


def connect(vm) -> AgentClient:
    client = AgentClient(mux_connect(vm), name="agent-probe")
    client.handshake(timeout=TIMEOUT_S)
    return client


@pytest.fixture
def agent_vm(native, short_tmp):
    vm = start_agent(native, short_tmp)
    yield vm
    vm.close()


@pytest.fixture
def client(agent_vm):
    c = connect(agent_vm)
    yield c
    c.close()


@pytest.fixture(scope="module")
def shared_client(native):
    """One VM and session for the protocol-error cases, which leave no state behind."""
    directory = Path(tempfile.mkdtemp(prefix="sma-", dir="/tmp"))
    vm = start_agent(native, directory)
    c = connect(vm)
    yield c
    c.close()
    vm.close()
    shutil.rmtree(directory, ignore_errors=True)


# --- AgentClient over the vsock mux ---------------------------------------------------------

def test_hello_and_echo(client):
    assert client.agent_software == "supermachine-probe-agent 0.1"
    status, out, err = run(client, ["echo", "hi"])
    assert (status.code, status.signal, out, err) == (0, None, b"hi\n", b"")
    assert run(client, ["false"])[0].code == 1
    assert run(client, ["/bin/true"])[0].code == 0


def test_count_lives_in_guest_ram(client):
    assert run(client, ["count"])[1] == b"1\n"
    assert run(client, script="count")[1] == b"2\n"


def test_unknown_command_exits_127_saying_so(client):
    status, out, err = run(client, ["ls", "-l", "/"])
    assert (status.code, out, err) == (127, b"", b"probe-agent: ls: not a built-in command\n")
    status, _, err = run(client, script="echo before; sleep 1")
    assert (status.code, err) == (127, b"probe-agent: sleep: not a built-in command\n")


def test_scripts_split_quote_and_keep_the_last_status(client):
    script = "echo 'a  b' \"c\\\"d\" e\\ f; uname -a\n# a comment\n\nhostname\nfalse"
    status, out, err = run(client, script=script)
    assert out == f"a  b c\"d e f\nsupermachine-probe-agent\n{HOSTNAME}\n".encode()
    assert (status.code, err) == (1, b"")
    assert run(client, ["sh", "-c", "echo -n x; echo y"])[1] == b"xy\n"
    status, out, err = run(client, script="echo ok\necho 'unterminated\necho never")
    assert (status.code, out) == (2, b"ok\n") and b"unterminated quoted string" in err


def test_what_the_host_sends_after_a_restore_succeeds(client):
    """snapshot.py's _refresh_guest: date -s @N, the hostname file, entropy for /dev/urandom."""
    status, out, _ = run(client, ["date", "-s", "@1764000000"])
    assert (status.code, out) == (0, b"Mon Nov 24 16:00:00 UTC 2025\n")
    assert client.write_file("/proc/sys/kernel/hostname", b"refreshed") == 9
    assert client.write_file("/dev/urandom", bytes(range(64))) == 64
    assert run(client, ["hostname"])[1] == b"refreshed\n"
    assert run(client, ["date"])[1].startswith(b"Mon Nov 24 16:00:")  # kvmclock advances it
    assert run(client, ["date", "-s", "yesterday"])[0].code == 1


def test_files_round_trip_and_fail_as_the_spec_says(client):
    assert client.write_file("/root/note", b"one\n") == 4
    append = u32(1) + u32(0o644) + pack_str("/root/note") + b"two\n"
    assert errors_after(client, encode_frame(FrameType.WRITE_FILE, RAW_BASE + 1, append)) == []
    assert client.read_file("/root/note") == b"one\ntwo\n"
    assert run(client, ["cat", "/root/note"])[1] == b"one\ntwo\n"
    assert client.read_file("/proc/sys/kernel/hostname") == HOSTNAME.encode()
    cases = [
        (lambda: client.read_file("/nope"), "read /nope: No such file or directory"),
        (lambda: client.write_file("/big", bytes(FILE_MAX_BYTES + 1)), "write /big: File too large"),
        (lambda: client.read_file("/dev/urandom"), "read /dev/urandom: Operation not supported"),
    ]
    for call, message in cases:
        with pytest.raises(RemoteError) as info:
            call()
        assert (info.value.code, info.value.message) == (ErrorCode.IO_FAILED, message)
    for i in range(FILES_MAX - 2):       # the hostname and /root/note hold two entries
        client.write_file(f"/tmp/f{i}", b"x")
    with pytest.raises(RemoteError, match="write /tmp/full: No space left on device"):
        client.write_file("/tmp/full", b"x")


def test_ping(client):
    assert client.ping(b"") > 0
    assert client.ping(b"\x00payload\xff" * 1000) > 0
    assert client.ping(bytes(MAX_PAYLOAD_BYTES)) > 0


def test_a_new_connection_after_the_host_closed_its_own(agent_vm):
    first = connect(agent_vm)
    assert run(first, ["count"])[1] == b"1\n"
    first.close()
    second = AgentClient(mux_connect(agent_vm))
    with pytest.raises(RemoteError) as info:     # a new connection starts a new session
        second.ping()
    assert info.value.code == ErrorCode.NOT_READY
    second.handshake(timeout=TIMEOUT_S)
    assert run(second, ["count"])[1] == b"2\n"
    second.close()
    assert b"host disconnected; session reset" in agent_vm.console_output()


def test_one_connection_at_a_time(agent_vm):
    first = connect(agent_vm)
    waiting = AgentClient(mux_connect(agent_vm))   # accepted by the guest's vsock: backlog
    with pytest.raises(TimeoutError):
        waiting.handshake(timeout=1)
    assert run(first, ["echo", "still served"])[1] == b"still served\n"
    first.close()
    waiting.handshake(timeout=TIMEOUT_S)
    assert run(waiting, ["echo", "now served"])[1] == b"now served\n"
    waiting.close()


def test_stream_without_credit_waits_and_takes_stdin_and_signals(client):
    """Output flows within the stream's credit; STDIN is taken and its credit returned;
    SIGNAL cannot interrupt a built-in; CREDIT lets the rest through."""
    client.write_file("/f", bytes(FILE_MAX_BYTES))
    commands = 100
    tap, sid = Tap(client), RAW_BASE + 2      # a raw stream: the client returns no credit
    since = tap.mark()
    assert errors_after(client, raw_exec(sid, "cat /f\n" * commands, keep_stdin=True)) == []
    held_back = tap.data_bytes[sid]
    assert 0 < held_back <= INITIAL_WINDOW_BYTES
    assert FrameType.EXIT not in [f.type for f in tap.on(sid, since)]
    assert errors_after(client, encode_frame(FrameType.STDIN, sid, b"input")) == []
    assert struct.unpack("<I", tap.wait_frame(sid, FrameType.CREDIT, since).payload) == (5,)
    assert errors_after(client, encode_frame(FrameType.STDIN, sid, bytes(INITIAL_WINDOW_BYTES + 1))) \
        == [(sid, ErrorCode.FLOW)]
    assert errors_after(client, encode_frame(FrameType.SIGNAL, sid, u32(9))) == []
    assert errors_after(client, encode_frame(FrameType.STDIN, sid, b"")) == []       # closes
    assert errors_after(client, encode_frame(FrameType.STDIN, sid, b"late")) \
        == [(sid, ErrorCode.BAD_STREAM)]
    assert tap.data_bytes[sid] == held_back
    assert errors_after(client, encode_frame(FrameType.CREDIT, sid, u32(commands * FILE_MAX_BYTES))) == []
    exit_frame = tap.wait_frame(sid, FrameType.EXIT, since)
    assert struct.unpack("<ii", exit_frame.payload) == (0, 0)
    assert tap.data_bytes[sid] == commands * FILE_MAX_BYTES


@pytest.mark.parametrize("name, data, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_bad_frame_gets_the_real_agents_error(shared_client, name, data, expected):
    assert errors_after(shared_client, data) == expected
    assert run(shared_client, ["echo", "ok"])[1] == b"ok\n"


def test_poweroff_ends_the_vm(agent_vm, client):
    client.poweroff()
    assert agent_vm.wait(TIMEOUT_S) == "stopped"
    assert agent_vm.exit_info()["reason"] == "guest_reset"
    assert b"probe-agent: poweroff requested by the host" in agent_vm.console_output()


def test_touch_makes_guest_memory_resident(native, short_tmp):
    vm = start_agent(native, short_tmp, memory_mib=128)
    try:
        client = connect(vm)
        before = vm.guest_resident_bytes()
        status, out, err = run(client, ["touch", "32"])
        assert status.code == 0 and out.startswith(b"touched 8192 pages in "), (out, err)
        assert vm.guest_resident_bytes() - before >= 32 << 20
        status, out, err = run(client, ["touch", "200"])
        assert status.code == 1 and b"do not fit in the guest RAM left" in err
    finally:
        vm.close()


def test_restore_resets_the_transport_and_the_probe_listens_on(native, short_tmp):
    """The core sends a transport reset to a restored guest: the connection of the snapshot
    is dropped, the listener kept, and guest RAM (the counter) carries on."""
    vm = start_agent(native, short_tmp)
    restored = None
    try:
        before = connect(vm)
        assert run(before, ["count"])[1] == b"1\n"
        vm.snapshot(short_tmp / "snap")
        restored = native.NativeVm.restore(short_tmp / "snap", vsock_uds_path=short_tmp / "r.sock")
        after = connect(restored)
        assert run(after, ["count"])[1] == b"2\n"
        assert run(before, ["count"])[1] == b"2\n"     # the original goes its own way
        assert b"vsock: transport reset" in restored.console_output()
        assert restored.device("virtio-vsock")["counters"]["events_sent"] == 1
        after.close()
        before.close()
    finally:
        if restored is not None:
            restored.close()
        vm.close()


# --- the public API: Image -> Vm ------------------------------------------------------------

def test_image_and_vm_run_on_the_agent_probe(native, short_tmp):
    probe = native.probe_path("agent")
    image = Image(kernel=probe, vmlinux=probe, initrd=probe, default_memory_mib=64,
                  description="the agent probe")
    config = VmConfig(engine="native", vsock_mux_dir=str(short_tmp))
    vm = image.start(config, boot_timeout=TIMEOUT_S)
    try:
        assert (vm.engine, vm.state) == ("native", "running")
        result = vm.run("echo hi")
        assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "", 0)
        assert vm.run("hostname").stdout == f"{vm.name}\n"     # from sm.hostname=
        vm.write_file("/root/note", "kept\n")
        assert vm.read_file("/root/note") == b"kept\n"
        assert vm.ping() > 0
        assert "supermachine-init: ready" in vm.console_output()
    finally:
        vm.stop()
    assert vm.state == "stopped"
    assert "poweroff requested by the host" in vm.console_output()


# --- the %%vm magic ---------------------------------------------------------------------------

def test_vm_magic_runs_a_cell_on_the_agent_probe(native, short_tmp, capsys, monkeypatch):
    # A config with its own kernel must not build (or even look for) the default image.
    def no_default_image(*args, **kwargs):
        raise AssertionError("the default image was asked for")

    monkeypatch.setattr(Image, "default", no_default_image)
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    monkeypatch.setattr(shell._supermachine_magics, "_image", None)   # not an earlier test's
    probe = native.probe_path("agent")
    shell.user_ns["probe_config"] = VmConfig(memory_mib=64, vsock_mux_dir=str(short_tmp)) \
        .with_assets(probe, probe)
    shell.run_cell_magic("vm", "--engine native --config probe_config",
                         "echo hello from the agent probe\ncount\nnope")
    captured = capsys.readouterr()
    assert "hello from the agent probe\n1\n" in captured.out
    assert "probe-agent: nope: not a built-in command" in captured.err
    assert "on native/kvm" in captured.out and ": exit 127 after " in captured.out
    assert shell._supermachine_magics.last_result.exit_code == 127


# --- a guest that ends its own VM -------------------------------------------------------------

GUEST_RAM_MIB = 96


def _process_resources() -> dict:
    """This process's OS threads (by name: vCPU and device threads are not Python threads), open
    fds, and mappings as large as a VM's guest RAM."""
    threads = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            threads.add(f"{tid}:{Path(f'/proc/self/task/{tid}/comm').read_text().strip()}")
        except OSError:
            pass            # a thread that just ended
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass            # the fd that listed /proc/self/fd
    ram = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if end - start >= GUEST_RAM_MIB << 20:
                ram.add(line.split()[0])
    return {"threads": threads, "fds": fds, "guest_ram": ram}


def _left_behind(before: dict, directory: Path) -> dict:
    now = _process_resources()
    left = {k: sorted(now[k] - before[k]) for k in now if now[k] - before[k]}
    if "threads" in left:       # Python threads' OS names say little: add theirs
        left["python_threads"] = sorted(t.name for t in threading.enumerate()
                                        if t is not threading.main_thread())
    files = sorted(p.name for p in directory.iterdir())
    if files:
        left["files"] = files
    return left


def _wait_for_nothing_left(before: dict, directory: Path, grace_s: float = 0.5) -> dict:
    deadline = time.monotonic() + grace_s
    while (left := _left_behind(before, directory)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


@pytest.mark.parametrize("how, reason", [
    ("reboot", "guest_reset"),
    # This host's KVM reports the empty-IDT int3 as an emulation failure, a real one (L1) as a
    # triple fault: either way the guest ended its own VM.
    ("triple", "triple_fault|emulation_failure"),
])
@pytest.mark.parametrize("noticed_by", ["stop", "watcher"])
def test_a_vm_the_guest_ended_frees_everything_at_once(native, short_tmp, how, reason,
                                                       noticed_by):
    """Guest RAM, fds, the vCPU and device threads and the vsock socket file go when the VM's
    end is noticed (by stop(), or by the watcher with no stop() yet), not at garbage collection."""
    probe = native.probe_path("agent")
    image = Image(kernel=probe, vmlinux=probe, initrd=probe, default_memory_mib=GUEST_RAM_MIB,
                  description="the agent probe")
    mux = short_tmp / "mux"
    mux.mkdir()
    config = VmConfig(engine="native", vsock_mux_dir=str(mux))
    image.start(config, boot_timeout=TIMEOUT_S).stop()   # imports and caches settle first
    gc.collect()
    gc.disable()            # what is freed must be freed by the VM's end, not by the collector
    try:
        before = _process_resources()
        vm = image.start(config, boot_timeout=TIMEOUT_S)
        assert vm.run("touch 32").exit_code == 0
        during = _left_behind(before, mux)
        assert during.get("guest_ram") and during.get("files"), during
        assert any(":sm-vcpu0" in t for t in during["threads"]), during
        with pytest.raises(VmError, match=reason):
            vm.run(how, timeout=TIMEOUT_S)
        if noticed_by == "watcher":
            assert vm.wait_stopped(TIMEOUT_S), vm
        else:
            vm.stop()
        assert vm.state == "failed" and re.search(reason, vm.failure), vm.failure
        # A joined thread's OS thread may take a moment more to leave /proc/self/task.
        assert _wait_for_nothing_left(before, mux) == {}
        vm.stop()
        assert _left_behind(before, mux) == {}
    finally:
        gc.enable()
