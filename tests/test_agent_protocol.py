"""Acceptance tests of the guest agent and its protocol (issue A), with real guests under QEMU.

Nothing here is mocked except one host-client property (a fake agent on a socketpair that
speaks another protocol version). Most tests share one VM; the fuzz test and the reconnect
test each get their own, so their damage cannot leak into the others.

Raw frames (``send_raw``) use stream ids from ``RAW_BASE`` up: the host client numbers its
own streams from 1, so the agent's answers on raw streams never reach a client stream and
their ERROR frames land in ``AgentClient.unclaimed_errors``. :class:`Tap` additionally
records every frame the agent sends, in order, for the checks that need more than errors.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import queue
import random
import socket
import struct
import threading
import time
import zlib

import pytest

from supermachine_jupyter.guest.agent import (
    INITIAL_WINDOW_BYTES,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    AgentClient,
    ErrorCode,
    Exit,
    Frame,
    FrameReader,
    FrameType,
    Output,
    RemoteError,
    encode_exec,
    encode_frame,
    pack_str,
    pack_strv,
    u32,
)
from supermachine_jupyter.errors import AgentError, ProtocolVersionError

pytestmark = pytest.mark.timeout(180)

RAW_BASE = 0xF0000000
E = ErrorCode
T = FrameType
DATA_TYPES = (T.STDOUT, T.STDERR, T.FILE_DATA)


# --- helpers ----------------------------------------------------------------------------------

class Tap:
    """Records every frame the agent sends, in arrival order, before the client sees it.

    Data frames (STDOUT/STDERR/FILE_DATA) are kept without their payload; ``data_bytes``
    counts their bytes per stream.
    """

    def __init__(self, client: AgentClient):
        self.frames: list[Frame] = []
        self.data_bytes: collections.Counter[int] = collections.Counter()
        self.cond = threading.Condition()
        inner = client._dispatch          # the reader thread calls self._dispatch(frame)

        def dispatch(frame: Frame) -> None:
            with self.cond:
                if frame.type in DATA_TYPES:
                    self.data_bytes[frame.stream] += len(frame.payload)
                    self.frames.append(Frame(frame.type, frame.stream, b""))
                else:
                    self.frames.append(frame)
                self.cond.notify_all()
            inner(frame)

        client._dispatch = dispatch

    def mark(self) -> int:
        with self.cond:
            return len(self.frames)

    def on(self, stream: int, since: int = 0) -> list[Frame]:
        with self.cond:
            return [f for f in self.frames[since:] if f.stream == stream]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_frame(self, stream: int, ftype: int, since: int = 0, timeout: float = 10.0) -> Frame:
        def find():
            return next((f for f in self.frames[since:]
                         if f.stream == stream and f.type == ftype), None)
        assert self.wait_for(lambda: find() is not None, timeout), \
            f"no frame 0x{ftype:02x} on stream {stream:#x} within {timeout} s"
        with self.cond:
            return find()


def drain_errors(client: AgentClient) -> list[RemoteError]:
    errors = []
    while True:
        try:
            errors.append(client.unclaimed_errors.get_nowait())
        except queue.Empty:
            return errors


def errors_after(client: AgentClient, data: bytes | list[bytes]) -> list[tuple[int, int]]:
    """Send raw bytes; return the (stream, code) of every unclaimed ERROR they caused.

    The agent answers frames in order, so once a PING sent after them is answered, every
    ERROR they caused has arrived.
    """
    client.ping()
    drain_errors(client)
    for piece in [data] if isinstance(data, bytes) else data:
        client.send_raw(piece)
    client.ping()
    return [(e.stream, e.code) for e in drain_errors(client)]


def header(ftype: int, stream: int, length: int, magic: bytes = b"SM", flags: int = 0,
           crc: int | None = None) -> bytes:
    head = struct.pack("<2sBBII", magic, ftype, flags, stream, length)
    return head + struct.pack("<I", zlib.crc32(head) if crc is None else crc)


def raw_exec(stream: int, script: str, keep_stdin: bool = False) -> bytes:
    return encode_frame(T.EXEC, stream, encode_exec(None, script, None, None, keep_stdin))


def run(client: AgentClient, argv=None, **kwargs) -> tuple[Exit, bytes, bytes]:
    out, err = bytearray(), bytearray()
    status = client.exec(argv, **kwargs).wait(timeout=60, on_stdout=out.extend,
                                                on_stderr=err.extend)
    return status, bytes(out), bytes(err)


def assert_healthy(vm) -> None:
    assert vm.state == "running", vm.failure
    vm.ping()
    assert vm.run("echo alive").stdout == "alive\n"


@pytest.fixture(scope="module")
def vm(start_vm):
    machine = start_vm()
    yield machine
    machine.stop()


@pytest.fixture(scope="module")
def client(vm) -> AgentClient:
    return vm.agent


@pytest.fixture(scope="module")
def tap(client) -> Tap:
    return Tap(client)


@pytest.fixture
def own_vm(start_vm):
    """A VM of the test's own, for tests that damage the session."""
    machine = start_vm()
    yield machine
    machine.stop()


# --- exec round trip --------------------------------------------------------------------------

def test_stdout_and_stderr_are_separate_and_binary_exact(client):
    status, out, err = run(client, script=r"printf 'out\377\000\001x'; printf 'err\376\n' >&2;"
                                          r" printf 'more\n'")
    assert status == Exit(0, None)
    assert out == b"out\xff\x00\x01xmore\n"
    assert err == b"err\xfe\n"

    status, out, err = run(client, script="for i in 1 2 3; do echo o$i; echo e$i >&2; done")
    assert (out, err) == (b"o1\no2\no3\n", b"e1\ne2\ne3\n")


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes(client, code):
    status, _, _ = run(client, script=f"exit {code}")
    assert status == Exit(code, None)
    assert status.ok == (code == 0)


@pytest.mark.parametrize("script, signo", [("kill -9 $$", 9), ("kill -TERM $$", 15),
                                           ("sh -c 'kill -SEGV $$'; exit $?", None)])
def test_signal_death_is_reported_as_signal(client, script, signo):
    status, _, _ = run(client, script=script)
    if signo is None:          # the inner shell died of SIGSEGV; the outer one reports 128+11
        assert status == Exit(128 + 11, None)
    else:
        assert status == Exit(None, signo)
        assert status.describe() == f"killed by {'SIGKILL' if signo == 9 else 'SIGTERM'}"


def test_argv_mode_env_and_cwd(client):
    assert run(client, ["/bin/echo", "a b", "  c"])[1:] == (b"a b   c\n", b"")
    assert run(client, ["echo", "found via PATH"])[1] == b"found via PATH\n"

    env = {"GREETING": "hi there", "EMPTY": "", "WEIRD": "a=b;$x \xe9"}
    _, out, _ = run(client, script='printf "%s|%s|%s|%s" "$GREETING" "${EMPTY-unset}" '
                                   '"$WEIRD" "$PATH"', env=env)
    assert out == "hi there||a=b;$x \xe9|/usr/sbin:/usr/bin:/sbin:/bin".encode()
    assert run(client, script='echo "$PATH"', env={"PATH": "/custom:/bin"})[1] == b"/custom:/bin\n"
    assert run(client, ["/bin/sh", "-c", 'echo "$X"'], env={"X": "argv+env"})[1] == b"argv+env\n"

    assert run(client, script="pwd", cwd="/tmp")[1] == b"/tmp\n"
    assert run(client, script="pwd")[1] == b"/\n"


@pytest.mark.parametrize("argv", [["/no/such/program", "x"], ["no-such-command-xyz"]])
def test_exec_of_missing_program_fails_naming_it(client, argv):
    with pytest.raises(RemoteError) as info:
        client.exec(argv).wait(timeout=10)
    assert info.value.code == E.EXEC_FAILED
    assert argv[0] in info.value.message
    assert "No such file" in info.value.message
    # A missing program inside a script is the shell's business: exit 127.
    assert run(client, script="no-such-command-xyz")[0] == Exit(127, None)


def test_exec_with_bad_cwd_fails(client):
    with pytest.raises(RemoteError) as info:
        client.exec(script="pwd", cwd="/no/such/dir").wait(timeout=10)
    assert info.value.code == E.EXEC_FAILED
    assert "chdir" in info.value.message and "/no/such/dir" in info.value.message
    with pytest.raises(RemoteError) as info:
        client.exec(["true"], cwd="/etc/passwd").wait(timeout=10)
    assert info.value.code == E.EXEC_FAILED


# --- volume and flow control --------------------------------------------------------------------

def test_10_mib_of_output_arrives_with_matching_checksum(client):
    size = 10 * 1024 * 1024
    status, out, err = run(client, script=f"head -c {size} /dev/urandom | tee /tmp/ten; "
                                          "sha256sum /tmp/ten >&2; rm /tmp/ten")
    assert status == Exit(0, None)
    assert len(out) == size
    assert err.split()[0].decode() == hashlib.sha256(out).hexdigest()


def test_paused_consumer_bounds_what_is_in_flight(client, tap):
    size = 4 * 1024 * 1024
    proc = client.exec(script=f"head -c {size} /dev/zero; echo done >&2")
    sid = proc.stream_id
    # Nobody consumes: the agent must stop at the initial window and leave `head` blocked.
    assert tap.wait_for(lambda: tap.data_bytes[sid] >= INITIAL_WINDOW_BYTES // 2, 10)
    time.sleep(1.0)
    queued = tap.data_bytes[sid]
    assert queued <= INITIAL_WINDOW_BYTES, f"{queued} bytes in flight without credit"
    assert queued >= INITIAL_WINDOW_BYTES // 2
    assert not [f for f in tap.on(sid) if f.type == T.EXIT], "command ran past its window"
    time.sleep(0.5)
    assert tap.data_bytes[sid] == queued, "the agent kept sending without credit"

    out, err = bytearray(), bytearray()
    assert proc.wait(timeout=60, on_stdout=out.extend, on_stderr=err.extend) == Exit(0, None)
    assert len(out) == size and out.count(0) == size and err == b"done\n"


def test_slow_consumer_gets_every_byte_within_the_window(client, tap):
    proc = client.exec(script="seq 1 200000")
    expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    sid, data, worst = proc.stream_id, bytearray(), 0
    for event in proc:
        if isinstance(event, Output):
            data += event.data
            worst = max(worst, tap.data_bytes[sid] - len(data))   # received, not yet taken
            time.sleep(0.01)
    assert proc.exit == Exit(0, None)
    assert data == expected
    assert len(expected) > 4 * INITIAL_WINDOW_BYTES
    assert 0 < worst <= INITIAL_WINDOW_BYTES


def test_stdin_bytes_are_delivered_exactly(client):
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    status, out, _ = run(client, ["sha256sum"], stdin=data)
    assert status == Exit(0, None)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    status, out, _ = run(client, ["cat"], stdin=data)
    assert out == data


def test_interactive_stdin_into_cat(client):
    proc = client.exec(["cat"], stdin=True)
    proc.write_stdin(b"hello\n")
    assert proc.next_event(timeout=10) == Output("stdout", b"hello\n")   # echoed while open
    proc.write_stdin(b"\x00\xffbinary")
    proc.close_stdin()
    out = bytearray()
    assert proc.wait(timeout=10, on_stdout=out.extend) == Exit(0, None)
    assert out == b"\x00\xffbinary"


def test_stdin_into_a_command_that_stops_reading(client):
    proc = client.exec(["head", "-c", "10"], stdin=True)
    data = bytes(range(256)) * 4096                   # 1 MiB, far beyond what head reads
    try:
        proc.write_stdin(data, timeout=20)            # credit keeps coming (dropped bytes)
        proc.close_stdin()
    except AgentError:
        pass                                          # or the command ended first: fine
    out = bytearray()
    assert proc.wait(timeout=20, on_stdout=out.extend) == Exit(0, None)
    assert out == data[:10]


def test_stdin_not_requested_reads_dev_null(client):
    assert run(client, ["cat"])[:2] == (Exit(0, None), b"")
    with pytest.raises(AgentError):
        client.exec(["cat"]).write_stdin(b"x")


# --- concurrency and signals -----------------------------------------------------------------

def test_concurrent_execs_interleave(client, tap):
    script = "for i in 1 2 3 4 5 6; do echo {tag}$i; sleep 0.1; done"
    since = tap.mark()
    procs = {tag: client.exec(script=script.format(tag=tag)) for tag in "AB"}
    results = {tag: run_collect(proc) for tag, proc in procs.items()}
    for tag, (status, out) in results.items():
        assert status == Exit(0, None)
        assert out.decode().split() == [f"{tag}{i}" for i in range(1, 7)]
    owner = {proc.stream_id: tag for tag, proc in procs.items()}
    order = [owner[f.stream] for f in tap.frames[since:]
             if f.type == T.STDOUT and f.stream in owner]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 6, f"outputs did not interleave: {''.join(order)}"


def run_collect(proc) -> tuple[Exit, bytes]:
    out = bytearray()
    return proc.wait(timeout=30, on_stdout=out.extend), bytes(out)


@pytest.mark.parametrize("signo", [15, 9, 2])
def test_signal_stops_sleep_within_a_second(vm, client, signo):
    proc = client.exec(script="sleep 100")
    assert proc.pid and proc.pid > 1
    time.sleep(0.2)
    started = time.monotonic()
    proc.signal(signo)
    status = proc.wait(timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"SIGNAL {signo} took {elapsed:.2f} s"
    assert status.signal == signo or status.code == 128 + signo
    assert_healthy(vm)


def test_signal_reaches_the_whole_process_group(client):
    proc = client.exec(script="sleep 100 & sleep 100 & wait")
    time.sleep(0.3)
    proc.signal(15)
    assert proc.wait(timeout=5) is not None
    _, out, _ = run(client, ["ps"])
    assert b"sleep 100" not in out, out.decode()


# --- files and ping ---------------------------------------------------------------------------

def test_write_and_read_file_round_trip(client):
    data = random.Random(11).randbytes(3 * 1024 * 1024 + 5)   # > MAX_PAYLOAD: chunked
    assert client.write_file("/tmp/round-trip.bin", data, mode=0o600) == len(data)
    assert client.read_file("/tmp/round-trip.bin") == data
    _, out, _ = run(client, script="sha256sum /tmp/round-trip.bin; stat -c %a /tmp/round-trip.bin")
    digest, _, perms = out.decode().split()
    assert digest == hashlib.sha256(data).hexdigest() and perms == "600"

    client.write_file("/tmp/empty", b"")
    assert client.read_file("/tmp/empty") == b""
    client.write_file("/tmp/round-trip.bin", b"short")          # truncates
    assert client.read_file("/tmp/round-trip.bin") == b"short"
    assert client.read_file("/proc/version").startswith(b"Linux version")
    run(client, ["rm", "-f", "/tmp/round-trip.bin", "/tmp/empty"])


@pytest.mark.parametrize("path", ["/no/such/file", "/tmp"])
def test_read_missing_file_or_directory_fails(client, path):
    with pytest.raises(RemoteError) as info:
        client.read_file(path)
    assert info.value.code == E.IO_FAILED and path in info.value.message


def test_write_into_missing_directory_fails(client):
    with pytest.raises(RemoteError) as info:
        client.write_file("/no/such/dir/f", b"x")
    assert info.value.code == E.IO_FAILED and "/no/such/dir/f" in info.value.message


def test_ping(vm, client):
    assert 0 < vm.ping() < 5
    assert client.ping(b"\x00payload\xff" * 1000) > 0
    assert client.ping(bytes(MAX_PAYLOAD_BYTES)) > 0


# --- protocol errors ------------------------------------------------------------------------

S = RAW_BASE + 0x1000


def _exec_payload(mode=1, argv=(b"true",), env=(), cwd=b"", flags=0) -> bytes:
    return u32(mode) + pack_strv(list(argv)) + pack_strv(list(env)) + pack_str(cwd) + u32(flags)


MALFORMED = [
    # (name, raw bytes, expected (stream, code) list)
    ("unknown type", encode_frame(0x55, S + 1, b"abc"), [(S + 1, E.BAD_TYPE)]),
    ("agent-only type", encode_frame(T.STDOUT, S + 2, b"x"), [(S + 2, E.BAD_TYPE)]),
    ("EXIT from host", encode_frame(T.EXIT, 0, u32(0) + u32(0)), [(0, E.BAD_TYPE)]),
    ("oversized, header only", header(T.PING, S + 3, MAX_PAYLOAD_BYTES + 1), [(S + 3, E.TOO_LONG)]),
    ("oversized then a frame", header(T.EXEC, S + 4, 0xFFFFFFFF) + encode_frame(0x66, S + 5),
     [(S + 4, E.TOO_LONG), (S + 5, E.BAD_TYPE)]),
    ("EXEC on stream 0", encode_frame(T.EXEC, 0, _exec_payload()), [(0, E.BAD_STREAM)]),
    ("WRITE_FILE on stream 0", encode_frame(T.WRITE_FILE, 0, u32(0) + u32(0o644) +
                                            pack_str("/tmp/x")), [(0, E.BAD_STREAM)]),
    ("READ_FILE on stream 0", encode_frame(T.READ_FILE, 0, pack_str("/etc/passwd")),
     [(0, E.BAD_STREAM)]),
    ("STDIN on unknown stream", encode_frame(T.STDIN, S + 6, b"data"), [(S + 6, E.BAD_STREAM)]),
    ("SIGNAL on unknown stream", encode_frame(T.SIGNAL, S + 7, u32(9)), [(S + 7, E.BAD_STREAM)]),
    ("CREDIT on unknown stream", encode_frame(T.CREDIT, S + 8, u32(9)), [(S + 8, E.BAD_STREAM)]),
    ("SIGNAL on stream 0", encode_frame(T.SIGNAL, 0, u32(9)), [(0, E.BAD_STREAM)]),
    ("EXEC empty payload", encode_frame(T.EXEC, S + 9), [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC truncated", encode_frame(T.EXEC, S + 9, _exec_payload()[:-1]), [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC trailing byte", encode_frame(T.EXEC, S + 9, _exec_payload() + b"\0"),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC mode 2", encode_frame(T.EXEC, S + 9, _exec_payload(mode=2)), [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC script with 2 words", encode_frame(T.EXEC, S + 9, _exec_payload(argv=(b"a", b"b"))),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC empty argv", encode_frame(T.EXEC, S + 9, _exec_payload(mode=0, argv=())),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC NUL in argv", encode_frame(T.EXEC, S + 9, _exec_payload(mode=0, argv=(b"/bin/t\0rue",))),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC NUL in env", encode_frame(T.EXEC, S + 9, _exec_payload(env=(b"A=\0",))),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC NUL in cwd", encode_frame(T.EXEC, S + 9, _exec_payload(cwd=b"/\0")),
     [(S + 9, E.BAD_PAYLOAD)]),
    # flags bit 1: a user string follows; without it, empty, too long or with a NUL: refused.
    ("EXEC flags 2 without user", encode_frame(T.EXEC, S + 9, _exec_payload(flags=2)),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC flags 4", encode_frame(T.EXEC, S + 9, _exec_payload(flags=4)), [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC empty user", encode_frame(T.EXEC, S + 9, _exec_payload(flags=2) + pack_str(b"")),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC user too long", encode_frame(T.EXEC, S + 9, _exec_payload(flags=2) + pack_str(b"u" * 256)),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC NUL in user", encode_frame(T.EXEC, S + 9, _exec_payload(flags=2) + pack_str(b"ro\0ot")),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC bytes after user", encode_frame(T.EXEC, S + 9, _exec_payload(flags=2) + pack_str(b"root")
                                           + b"x"), [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC huge argv count", encode_frame(T.EXEC, S + 9, u32(0) + u32(0xFFFFFFFF)),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("EXEC string past the end", encode_frame(T.EXEC, S + 9, u32(0) + u32(1) + u32(1000) + b"ab"),
     [(S + 9, E.BAD_PAYLOAD)]),
    ("WRITE_FILE flags 2", encode_frame(T.WRITE_FILE, S + 10, u32(2) + u32(0o644) +
                                        pack_str("/tmp/x")), [(S + 10, E.BAD_PAYLOAD)]),
    ("WRITE_FILE bad mode", encode_frame(T.WRITE_FILE, S + 10, u32(0) + u32(0o10000) +
                                         pack_str("/tmp/x")), [(S + 10, E.BAD_PAYLOAD)]),
    ("WRITE_FILE empty path", encode_frame(T.WRITE_FILE, S + 10, u32(0) + u32(0o644) +
                                           pack_str("")), [(S + 10, E.BAD_PAYLOAD)]),
    ("WRITE_FILE NUL in path", encode_frame(T.WRITE_FILE, S + 10, u32(0) + u32(0o644) +
                                            pack_str("/tmp/a\0b") + b"data"),
     [(S + 10, E.BAD_PAYLOAD)]),
    ("WRITE_FILE truncated", encode_frame(T.WRITE_FILE, S + 10, u32(0) + u32(0o644)[:2]),
     [(S + 10, E.BAD_PAYLOAD)]),
    ("READ_FILE trailing byte", encode_frame(T.READ_FILE, S + 11, pack_str("/etc/passwd") + b"x"),
     [(S + 11, E.BAD_PAYLOAD)]),
    ("READ_FILE path too long", encode_frame(T.READ_FILE, S + 11, pack_str("/" * 4097)),
     [(S + 11, E.BAD_PAYLOAD)]),
    ("READ_FILE empty path", encode_frame(T.READ_FILE, S + 11, pack_str("")),
     [(S + 11, E.BAD_PAYLOAD)]),
    ("HELLO on a stream", encode_frame(T.HELLO, S + 12, u32(1) + pack_str("x")),
     [(S + 12, E.BAD_PAYLOAD)]),
    ("HELLO trailing byte", encode_frame(T.HELLO, 0, u32(1) + pack_str("x") + b"!"),
     [(0, E.BAD_PAYLOAD)]),
    ("garbage", b"this is not a frame header at all!" * 3, [(0, E.BAD_HEADER)]),
    ("bad CRC", header(T.PING, S + 13, 0, crc=12345), [(0, E.BAD_HEADER)]),
    ("non-zero flags", header(T.PING, S + 13, 0, flags=1), [(0, E.BAD_HEADER)]),
    ("bad magic", header(T.PING, S + 13, 0, magic=b"MS"), [(0, E.BAD_HEADER)]),
    ("garbage then a frame", b"\x00\x01SM\xff" * 7 + encode_frame(0x70, S + 14),
     [(0, E.BAD_HEADER), (S + 14, E.BAD_TYPE)]),
    ("two garbage runs", b"junk" * 5 + encode_frame(0x70, S + 15) + b"more junk" * 2
     + encode_frame(0x71, S + 16),
     [(0, E.BAD_HEADER), (S + 15, E.BAD_TYPE), (0, E.BAD_HEADER), (S + 16, E.BAD_TYPE)]),
]


@pytest.mark.parametrize("name, data, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_bad_frame_gets_the_right_error(vm, client, name, data, expected):
    assert errors_after(client, data) == expected
    assert run(client, ["echo", "ok"])[1] == b"ok\n"


def test_frame_split_into_pieces_is_reassembled(client):
    frame = encode_frame(0x5A, S + 20, b"payload" * 10)
    pieces = [frame[:1], frame[1:7], frame[7:16], frame[16:17], frame[17:]]
    client.ping()
    drain_errors(client)
    for piece in pieces:              # each piece in its own write, with time to arrive alone
        client.send_raw(piece)
        time.sleep(0.05)
    client.ping()
    assert [(e.stream, e.code) for e in drain_errors(client)] == [(S + 20, E.BAD_TYPE)]


def test_errors_on_an_open_stream(client, tap):
    sid = S + 100
    since = tap.mark()
    assert errors_after(client, raw_exec(sid, "sleep 30")) == []
    assert [f.type for f in tap.on(sid, since)] == [T.STARTED]
    cases = [
        (raw_exec(sid, "echo duplicate"), E.BAD_STREAM),
        (encode_frame(T.WRITE_FILE, sid, u32(0) + u32(0o644) + pack_str("/tmp/dup")), E.BAD_STREAM),
        (encode_frame(T.READ_FILE, sid, pack_str("/etc/passwd")), E.BAD_STREAM),
        (encode_frame(T.STDIN, sid, b"no stdin was asked for"), E.BAD_STREAM),
        (encode_frame(T.SIGNAL, sid, u32(0)), E.BAD_PAYLOAD),
        (encode_frame(T.SIGNAL, sid, u32(65)), E.BAD_PAYLOAD),
        (encode_frame(T.SIGNAL, sid, b"\x09\x00\x00"), E.BAD_PAYLOAD),
        (encode_frame(T.SIGNAL, sid, u32(9) + b"\x00"), E.BAD_PAYLOAD),
        (encode_frame(T.CREDIT, sid, b"\x01\x00\x00"), E.BAD_PAYLOAD),
        (encode_frame(0x42, sid, b""), E.BAD_TYPE),
    ]
    for data, code in cases:
        assert errors_after(client, data) == [(sid, code)], data[:40]
    assert [f.type for f in tap.on(sid, since) if f.type != T.ERROR] == [T.STARTED], \
        "the command must still run"
    assert errors_after(client, encode_frame(T.SIGNAL, sid, u32(9))) == []
    exit_frame = tap.wait_frame(sid, T.EXIT, since)
    assert struct.unpack("<ii", exit_frame.payload) == (-1, 9)
    # The stream is gone once it ended: its id is unknown again, then reusable.
    assert errors_after(client, encode_frame(T.SIGNAL, sid, u32(9))) == [(sid, E.BAD_STREAM)]
    reuse = tap.mark()
    assert errors_after(client, raw_exec(sid, "exit 4")) == []
    assert struct.unpack("<ii", tap.wait_frame(sid, T.EXIT, reuse).payload) == (4, 0)


def test_stdin_beyond_credit_is_a_flow_error(client, tap):
    sid = S + 101
    since = tap.mark()
    assert errors_after(client, raw_exec(sid, "sleep 30", keep_stdin=True)) == []
    too_much = encode_frame(T.STDIN, sid, bytes(INITIAL_WINDOW_BYTES + 1))
    assert errors_after(client, too_much) == [(sid, E.FLOW)]
    assert errors_after(client, encode_frame(T.STDIN, sid, b"fits")) == []
    assert errors_after(client, encode_frame(T.STDIN, sid, b"")) == []          # close stdin
    assert errors_after(client, encode_frame(T.STDIN, sid, b"late")) == [(sid, E.BAD_STREAM)]
    assert errors_after(client, encode_frame(T.SIGNAL, sid, u32(9))) == []
    tap.wait_frame(sid, T.EXIT, since)


def test_too_many_streams(vm, client, tap):
    ids = [S + 200 + i for i in range(64)]
    since = tap.mark()
    opened = errors_after(client, b"".join(raw_exec(i, "sleep 30") for i in ids))
    assert opened == []
    assert tap.wait_for(lambda: len([f for f in tap.frames[since:] if f.type == T.STARTED]) == 64)
    assert errors_after(client, raw_exec(S + 300, "true")) == [(S + 300, E.TOO_MANY)]
    assert errors_after(client, encode_frame(T.READ_FILE, S + 301, pack_str("/etc/passwd"))) \
        == [(S + 301, E.TOO_MANY)]
    with pytest.raises(RemoteError) as info:
        client.exec(["true"]).wait(timeout=10)
    assert info.value.code == E.TOO_MANY
    vm.ping()                                   # control frames need no stream
    assert errors_after(client, b"".join(encode_frame(T.SIGNAL, i, u32(9)) for i in ids)) == []
    assert tap.wait_for(lambda: len([f for f in tap.frames[since:] if f.type == T.EXIT]) == 64, 20)
    assert_healthy(vm)


def test_agent_answers_hello_of_another_version_and_resets_the_session(vm, client, tap):
    sleeper = S + 400
    since = tap.mark()
    assert errors_after(client, raw_exec(sleeper, "sleep 100")) == []
    tap.wait_frame(sleeper, T.STARTED, since)
    client.send_raw(encode_frame(T.HELLO, 0, u32(99) + pack_str("test host speaking v99")))
    hello = tap.wait_frame(0, T.HELLO, since)
    version, n = struct.unpack_from("<II", hello.payload)
    assert version == PROTOCOL_VERSION == 1
    assert hello.payload[8:8 + n].startswith(b"supermachine-agent")
    # The new session killed the old session's command and forgot its stream.
    forgotten = errors_after(client, encode_frame(T.SIGNAL, sleeper, u32(9)))
    assert forgotten == [(sleeper, E.BAD_STREAM)]
    assert b"sleep 100" not in run(client, ["ps"])[1]
    assert_healthy(vm)


def test_host_client_rejects_another_protocol_version():
    host_end, agent_end = socket.socketpair()
    client = AgentClient(host_end, name="fake")
    received = []

    def fake_agent() -> None:
        reader, frames = FrameReader(), []
        while not frames:
            frames += reader.feed(agent_end.recv(4096))
        received.extend(frames)
        agent_end.sendall(encode_frame(T.HELLO, 0, u32(2) + pack_str("fake agent 2.0")))

    thread = threading.Thread(target=fake_agent, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProtocolVersionError) as info:
            client.handshake(timeout=5)
    finally:
        thread.join(5)
        client.close()
        agent_end.close()
    message = str(info.value)
    assert "version 2" in message and "version 1" in message, message
    assert received[0].type == T.HELLO and struct.unpack_from("<I", received[0].payload)[0] == 1


# --- host client ------------------------------------------------------------------------------

def test_iterator_and_callback_styles(client):
    script = "echo one; echo two >&2; echo three; exit 5"
    with client.exec(script=script) as proc:
        events = list(proc)
    assert events[-1] == Exit(5, None)
    outputs = [e for e in events[:-1] if isinstance(e, Output)]
    assert len(outputs) == len(events) - 1
    assert b"".join(e.data for e in outputs if e.stream == "stdout") == b"one\nthree\n"
    assert b"".join(e.data for e in outputs if e.stream == "stderr") == b"two\n"

    out, err = [], []
    status = client.exec(script=script).wait(on_stdout=out.append, on_stderr=err.append)
    assert status == Exit(5, None)
    assert (b"".join(out), b"".join(err)) == (b"one\nthree\n", b"two\n")


def test_context_manager_kills_an_abandoned_command(client):
    with client.exec(script="sleep 100") as proc:
        assert proc.pid
    assert proc.exit is not None
    assert b"sleep 100" not in run(client, ["ps"])[1]


def test_many_threads_share_one_client(client):
    threads, per_thread = 8, 5
    barrier = threading.Barrier(threads)
    failures: list[str] = []

    def worker(t: int) -> None:
        try:
            barrier.wait(10)
            procs = [(i, client.exec(script=f"echo out-{t}-{i}; echo err-{t}-{i} >&2; "
                                            f"sleep 0.{i}; exit {(t + i) % 7}"))
                     for i in range(per_thread)]
            for i, proc in procs:
                out, err = bytearray(), bytearray()
                status = proc.wait(timeout=60, on_stdout=out.extend, on_stderr=err.extend)
                if (status, bytes(out), bytes(err)) != (Exit((t + i) % 7, None),
                                                        f"out-{t}-{i}\n".encode(),
                                                        f"err-{t}-{i}\n".encode()):
                    failures.append(f"{t}/{i}: {status} {out!r} {err!r}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"{t}: {exc!r}")

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(90)
    assert not failures, failures


# --- fuzz --------------------------------------------------------------------------------------

FUZZ_SEED = 20240611
FUZZ_FRAMES = 10_000
FUZZ_BATCH = 200
VICTIM = RAW_BASE - 0x1000      # a stream the fuzzer keeps open: a `sleep` that must survive
FUZZ_FIXED_IDS = [RAW_BASE + 1, RAW_BASE + 2, RAW_BASE + 3]


class Malformed(Exception):
    pass


class Cursor:
    """A mirror of the agent's payload cursor (protocol.c), to classify mutants."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u32(self) -> int:
        if len(self.data) - self.pos < 4:
            raise Malformed
        (value,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        return value

    def str(self, nul_ok: bool = False) -> bytes:
        n = self.u32()
        if len(self.data) - self.pos < n:
            raise Malformed
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        if not nul_ok and b"\0" in value:
            raise Malformed
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Malformed


def _valid(check, payload: bytes) -> bool:
    try:
        check(Cursor(payload))
        return True
    except Malformed:
        return False


def _check_exec(c: Cursor) -> None:
    mode = c.u32()
    argc = c.u32()
    if mode > 1 or argc > 4096 or argc == 0 or (mode == 1 and argc != 1):
        raise Malformed
    for _ in range(argc):
        c.str()
    envc = c.u32()
    if envc > 4096:
        raise Malformed
    for _ in range(envc):
        c.str()
    c.str()
    if c.u32() > 1:
        raise Malformed
    c.end()


def _check_path(c: Cursor) -> None:
    path = c.str()
    if not 1 <= len(path) <= 4096:
        raise Malformed


def _check_write_file(c: Cursor) -> None:
    if c.u32() > 1 or c.u32() > 0o7777:
        raise Malformed
    _check_path(c)


def _check_read_file(c: Cursor) -> None:
    _check_path(c)
    c.end()


def _check_signal(c: Cursor) -> None:
    if not 1 <= c.u32() <= 64:
        raise Malformed
    c.end()


def _check_credit(c: Cursor) -> None:
    c.u32()
    c.end()


@dataclasses.dataclass
class FuzzItem:
    data: bytes
    expect: list[tuple]          # ("ERROR", stream, code) or ("PONG", stream, payload)
    frames: int = 1


class FuzzGenerator:
    """Random and mutated frames whose every answer is predictable.

    No item can be a valid request that does something: requests on fresh ids are made
    malformed (checked against a mirror of the agent's parser), those on the victim's id
    are refused as "in use", and HELLO/POWEROFF/ERROR are never sent well-formed.
    """

    NEVER_RANDOM = {T.HELLO, T.PING, T.POWEROFF, T.EXEC, T.STDIN, T.SIGNAL, T.CREDIT,
                    T.WRITE_FILE, T.READ_FILE, T.ERROR}
    INTERESTING = [0, 1, 2, 3, 4, 64, 65, 255, 4096, 4097, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.kinds = collections.Counter()

    # -- building blocks ---------------------------------------------------------------
    def word(self) -> bytes:
        return bytes(self.rng.choice(b"abcdefghijklmnopqrstuvwxyz/._-=")
                     for _ in range(self.rng.randint(1, 12)))

    def stream(self, victim_ok: bool = True) -> int:
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.30 and victim_ok:
            return VICTIM
        if r < 0.45:
            return self.rng.choice(FUZZ_FIXED_IDS)
        return self.rng.randint(RAW_BASE, 0xFFFFFFFF)

    def mutate(self, payload: bytes) -> bytes:
        rng, b = self.rng, bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(8)
            if op == 0 and b:                                   # truncate
                del b[rng.randrange(len(b)):]
            elif op == 1 and b:                                 # flip bits
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 2 and len(b) >= 4:                       # a length/count field
                at = rng.randrange(len(b) - 3)
                value = rng.choice(self.INTERESTING + [rng.getrandbits(32), len(b), len(b) - at])
                struct.pack_into("<I", b, at, value & 0xFFFFFFFF)
            elif op == 3:                                       # insert bytes
                at = rng.randint(0, len(b))
                b[at:at] = rng.randbytes(rng.randint(1, 8))
            elif op == 4:                                       # append bytes
                b += rng.randbytes(rng.randint(1, 16))
            elif op == 5 and b:                                 # delete a slice
                at = rng.randrange(len(b))
                del b[at:at + rng.randint(1, 8)]
            elif op == 6:                                       # random payload
                b = bytearray(rng.randbytes(rng.randint(0, 64)))
            elif op == 7 and b:                                 # NUL somewhere
                b[rng.randrange(len(b))] = 0
        return bytes(b)

    def frame(self, ftype: int, stream: int, payload: bytes, *expect) -> FuzzItem:
        return FuzzItem(encode_frame(ftype, stream, payload), list(expect))

    # -- templates (valid payloads before mutation) -----------------------------------
    def exec_payload(self) -> bytes:
        if self.rng.random() < 0.5:
            return encode_exec(["/bin/echo", "fuzz", self.word().decode()], None,
                               {"FUZZ": self.word().decode()}, self.rng.choice(["", "/tmp"]),
                               self.rng.random() < 0.5)
        return encode_exec(None, self.rng.choice(["exit 0", "true", ":"]), None, None, False)

    def write_file_payload(self) -> bytes:
        return (u32(self.rng.randint(0, 1)) + u32(0o644) + pack_str(b"/tmp/fuzz/" + self.word())
                + self.rng.randbytes(self.rng.randint(0, 32)))

    # -- items ------------------------------------------------------------------------
    def item(self) -> FuzzItem:
        kind = self.rng.choices(
            ["exec", "write_file", "read_file", "hello", "signal", "credit", "stdin", "ping",
             "random_type", "oversized", "garbage", "big"],
            [15, 10, 8, 5, 8, 8, 7, 8, 20, 5, 6, 0.05])[0]
        self.kinds[kind] += 1
        return getattr(self, f"item_{kind}")()

    def request(self, ftype: int, payload: bytes, check) -> FuzzItem:
        """EXEC/READ_FILE: answers depend on the stream; fresh ids get malformed payloads."""
        stream = self.stream()
        if stream == 0:
            return self.frame(ftype, 0, payload, ("ERROR", 0, E.BAD_STREAM))
        if stream == VICTIM:
            return self.frame(ftype, VICTIM, payload, ("ERROR", VICTIM, E.BAD_STREAM))
        if _valid(check, payload):
            payload += self.rng.randbytes(1)      # trailing byte: malformed for sure
        assert not _valid(check, payload)
        return self.frame(ftype, stream, payload, ("ERROR", stream, E.BAD_PAYLOAD))

    def item_exec(self) -> FuzzItem:
        return self.request(T.EXEC, self.mutate(self.exec_payload()), _check_exec)

    def item_read_file(self) -> FuzzItem:
        path = self.rng.choice([b"/etc/passwd", b"/proc/version", b"/tmp/none", self.word()])
        return self.request(T.READ_FILE, self.mutate(pack_str(path)), _check_read_file)

    def item_write_file(self) -> FuzzItem:
        stream = self.stream()
        b = bytearray(self.mutate(self.write_file_payload()))
        if stream not in (0, VICTIM):
            # The data field takes any trailing bytes, so poison a fixed-position field.
            poison = self.rng.randrange(4)
            if len(b) < 12 or poison == 0:
                if len(b) >= 4:
                    struct.pack_into("<I", b, 0, self.rng.randint(2, 0xFFFFFFFF))
            elif poison == 1:
                struct.pack_into("<I", b, 4, self.rng.randint(0o10000, 0xFFFFFFFF))
            elif poison == 2:
                struct.pack_into("<I", b, 8, self.rng.choice(
                    [0, 4097, 0xFFFFFFFF, len(b) - 12 + 1 + self.rng.randrange(100)]))
            else:
                n = struct.unpack_from("<I", b, 8)[0]
                if 1 <= n <= len(b) - 12:
                    b[12 + self.rng.randrange(n)] = 0
                else:
                    struct.pack_into("<I", b, 0, 2)
            assert not _valid(_check_write_file, bytes(b))
            return self.frame(T.WRITE_FILE, stream, bytes(b), ("ERROR", stream, E.BAD_PAYLOAD))
        return self.frame(T.WRITE_FILE, stream, bytes(b), ("ERROR", stream, E.BAD_STREAM))

    def item_hello(self) -> FuzzItem:
        stream = self.stream()
        if stream == 0:                 # a good HELLO would start a new session: never on 0
            stream = FUZZ_FIXED_IDS[0]
        payload = self.mutate(u32(1) + pack_str("fuzz host"))
        return self.frame(T.HELLO, stream, payload, ("ERROR", stream, E.BAD_PAYLOAD))

    def _victim_control(self, ftype: int, payload: bytes, check) -> FuzzItem:
        stream = self.stream()
        if stream != VICTIM:
            return self.frame(ftype, stream, payload, ("ERROR", stream, E.BAD_STREAM))
        if _valid(check, payload):
            payload += self.rng.randbytes(1)
        return self.frame(ftype, VICTIM, payload, ("ERROR", VICTIM, E.BAD_PAYLOAD))

    def item_signal(self) -> FuzzItem:
        return self._victim_control(T.SIGNAL, self.mutate(u32(self.rng.randint(1, 64))),
                                    _check_signal)

    def item_credit(self) -> FuzzItem:
        return self._victim_control(T.CREDIT, self.mutate(u32(65536)), _check_credit)

    def item_stdin(self) -> FuzzItem:
        # The victim runs without stdin, so STDIN is refused on every stream.
        stream = self.stream()
        payload = self.rng.randbytes(self.rng.choice([0, 1, 7, 100, 4096]))
        return self.frame(T.STDIN, stream, payload, ("ERROR", stream, E.BAD_STREAM))

    def item_ping(self) -> FuzzItem:
        stream = self.stream()
        payload = self.rng.randbytes(self.rng.choice([0, 1, 16, 300]))
        return self.frame(T.PING, stream, payload, ("PONG", stream, payload))

    def random_type(self) -> int:
        while True:
            ftype = self.rng.randrange(256)
            if ftype not in self.NEVER_RANDOM:
                return ftype

    def item_random_type(self) -> FuzzItem:
        stream = self.stream()
        payload = self.rng.randbytes(self.rng.choice([0, 1, 4, 8, 33, 200, 2000]))
        return self.frame(self.random_type(), stream, payload, ("ERROR", stream, E.BAD_TYPE))

    def item_big(self) -> FuzzItem:
        stream = self.stream()
        return self.frame(self.random_type(), stream, self.rng.randbytes(MAX_PAYLOAD_BYTES),
                          ("ERROR", stream, E.BAD_TYPE))

    def item_oversized(self) -> FuzzItem:
        stream = self.stream()
        length = self.rng.choice([MAX_PAYLOAD_BYTES + 1, self.rng.randint(MAX_PAYLOAD_BYTES + 1,
                                                                          0xFFFFFFFF)])
        ftype = self.rng.choice([T.EXEC, T.WRITE_FILE, T.STDIN, T.PING, self.random_type()])
        return FuzzItem(header(ftype, stream, length), [("ERROR", stream, E.TOO_LONG)])

    def item_garbage(self) -> FuzzItem:
        rng = self.rng
        style = rng.randrange(4)
        if style == 0:
            junk = rng.randbytes(rng.randint(1, 64))
        elif style == 1:
            junk = header(T.PING, self.stream(), 4, crc=rng.getrandbits(32)) + rng.randbytes(4)
        elif style == 2:
            junk = header(T.PING, self.stream(), 0, flags=rng.randint(1, 255))
        else:
            junk = header(T.PING, self.stream(), 0, magic=rng.randbytes(2).replace(b"S", b"s"))
        # Garbage is followed by a well-framed item, so each run yields exactly one BAD_HEADER.
        follow = self.item_random_type()
        return FuzzItem(junk + follow.data, [("ERROR", 0, E.BAD_HEADER)] + follow.expect, 2)


def _answers(frames: list[Frame]) -> list[tuple]:
    out = []
    for f in frames:
        if f.type == T.ERROR:
            out.append(("ERROR", f.stream, struct.unpack_from("<I", f.payload)[0]))
        elif f.type == T.PONG:
            out.append(("PONG", f.stream, f.payload))
        else:
            out.append(("UNEXPECTED", f.type, f.stream, f.payload[:40]))
    return out


def _agent_rss_kib(client: AgentClient) -> int:
    status = client.read_file("/proc/1/status").decode()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_fuzz_frames_never_kill_the_agent(own_vm):
    vm, client = own_vm, own_vm.agent
    tap = Tap(client)
    rng = random.Random(FUZZ_SEED)
    gen = FuzzGenerator(rng)

    since = tap.mark()
    assert errors_after(client, raw_exec(VICTIM, "sleep 1000")) == []
    tap.wait_frame(VICTIM, T.STARTED, since)
    # Warm up (touch the agent's whole input buffer), then note its memory.
    errors_after(client, encode_frame(0x60, RAW_BASE, bytes(MAX_PAYLOAD_BYTES)))
    rss_before = _agent_rss_kib(client)

    def relevant(f: Frame) -> bool:       # the client's own PINGs use small stream ids
        return f.stream == 0 or f.stream >= VICTIM

    frames_sent = items_sent = 0
    started = time.monotonic()
    while frames_sent < FUZZ_FRAMES:
        batch = [gen.item() for _ in range(FUZZ_BATCH)]
        expected = [answer for item in batch for answer in item.expect]
        mark = tap.mark()
        client.send_raw(b"".join(item.data for item in batch))
        client.ping(timeout=30)
        got = _answers([f for f in tap.frames[mark:] if relevant(f)])
        if got != expected:
            i = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b),
                     min(len(got), len(expected)))
            pytest.fail(f"batch after {frames_sent} frames: answer #{i} is "
                        f"{got[i] if i < len(got) else 'missing'}, expected "
                        f"{expected[i] if i < len(expected) else 'nothing'}")
        assert vm.state == "running" and not client.closed
        frames_sent += sum(item.frames for item in batch)
        items_sent += len(batch)
    elapsed = time.monotonic() - started

    # The victim survived every mutated SIGNAL/CREDIT/EXEC aimed at it.
    assert [f.type for f in tap.on(VICTIM, since) if f.type not in (T.ERROR, T.PONG)] \
        == [T.STARTED]
    errors_after(client, encode_frame(T.SIGNAL, VICTIM, u32(9)))
    assert struct.unpack("<ii", tap.wait_frame(VICTIM, T.EXIT, since).payload) == (-1, 9)
    assert_healthy(vm)
    assert run(client, script="test -e /tmp/fuzz && echo leaked; echo checked")[1] == b"checked\n"
    rss_after = _agent_rss_kib(client)
    print(f"\nfuzz: {frames_sent} frames in {items_sent} items, {elapsed:.1f} s, kinds "
          f"{dict(gen.kinds)}, agent RSS {rss_before} -> {rss_after} KiB")
    assert rss_after - rss_before < 1024, "the agent's memory grew under fuzzing"
    assert sum(gen.kinds.values()) == items_sent and gen.kinds["garbage"] > 50


def _reconnect(vm) -> AgentClient:
    vm.agent.close()
    time.sleep(0.5)                          # let the agent notice the hang-up
    return AgentClient(vm.instance.connect_agent(timeout=10), name="second")


def test_reconnected_host_must_say_hello_first(own_vm):
    sleeper = own_vm.agent.exec(script="sleep 100")
    assert sleeper.pid                       # STARTED has arrived: nothing is in flight
    client = _reconnect(own_vm)
    try:
        client.send_raw(encode_frame(T.PING, 0, b"early") + raw_exec(RAW_BASE + 1, "true"))
        first = client.unclaimed_errors.get(timeout=10)
        second = client.unclaimed_errors.get(timeout=10)
        assert (first.stream, first.code) == (0, E.NOT_READY)
        assert (second.stream, second.code) == (RAW_BASE + 1, E.NOT_READY)
        assert client.handshake(timeout=10).startswith("supermachine-agent")
        status, out, _ = run(client, ["ps"])
        assert status == Exit(0, None)
        assert b"sleep 100" not in out, "the old session's command outlived its host"
    finally:
        client.close()


def test_host_leaving_while_the_agent_writes_does_not_leak_into_the_next_session(own_vm):
    own_vm.agent.exec(script="sleep 100")    # its STARTED is written after the host has gone
    client = _reconnect(own_vm)
    tap = Tap(client)
    try:
        client.send_raw(encode_frame(T.PING, 0, b"early"))
        error = client.unclaimed_errors.get(timeout=3)
        assert (error.stream, error.code) == (0, E.NOT_READY)
        assert [f.type for f in tap.frames] == [T.ERROR], "stale frames of the old session"
    finally:
        client.close()
