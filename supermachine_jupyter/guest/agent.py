"""Host side of the guest agent protocol (``native/guest/PROTOCOL.md``), shared by all engines.

:class:`AgentClient` speaks the protocol over any connected stream socket: a QEMU
virtio-serial chardev, or the native core's vsock mux. It is thread-safe: one reader thread
demultiplexes frames into per-stream queues, writers serialise on a lock, and any number of
threads may run commands at once.

The guest is hostile (``DESIGN.md``, "Trust model"): every frame is checked, nothing the agent
sends is buffered beyond the credit the host granted, and a frame that breaks the protocol
closes the connection with a reason that says so.

Streamed output comes two ways::

    with client.exec(script="seq 3") as proc:
        for event in proc:            # iterator style: Output(...) ... then Exit(...)
            print(event)

    status = client.exec(script="seq 3").wait(on_stdout=sys.stdout.buffer.write)  # callbacks
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import socket
import struct
import threading
import time
import zlib
from typing import Callable, Iterator

from ..errors import AgentError, ProtocolVersionError

PROTOCOL_VERSION = 1
HOST_SOFTWARE = "supermachine_jupyter host 0.1"
HEADER = struct.Struct("<2sBBII")      # magic, type, flags, stream, length (+ u32 crc)
HEADER_BYTES = 16
MAGIC = b"SM"
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 65536
INITIAL_WINDOW_BYTES = 262144
#: How many ERROR frames for no open stream are kept (the oldest go first).
MAX_UNCLAIMED_ERRORS = 256
#: ``read_file``'s default limit: larger files are refused, not read into memory.
DEFAULT_READ_LIMIT_BYTES = 64 * 1024 * 1024


class FrameType:
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    POWEROFF = 0x04
    EXEC = 0x10
    STARTED = 0x11
    STDIN = 0x12
    STDOUT = 0x13
    STDERR = 0x14
    EXIT = 0x15
    SIGNAL = 0x16
    CREDIT = 0x17
    WRITE_FILE = 0x20
    READ_FILE = 0x21
    FILE_DATA = 0x22
    OK = 0x23
    ERROR = 0x7F


class ErrorCode:
    BAD_HEADER = 1
    TOO_LONG = 2
    BAD_TYPE = 3
    BAD_STREAM = 4
    BAD_PAYLOAD = 5
    TOO_MANY = 6
    EXEC_FAILED = 7
    IO_FAILED = 8
    FLOW = 9
    NOT_READY = 10


ERROR_NAMES = {v: k for k, v in vars(ErrorCode).items() if not k.startswith("_")}


class ProtocolViolation(AgentError):
    """The guest agent sent something the protocol does not allow; the connection is closed."""


# --- encoding -----------------------------------------------------------------------------

def encode_frame(frame_type: int, stream: int, payload: bytes = b"") -> bytes:
    head = HEADER.pack(MAGIC, frame_type, 0, stream, len(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def pack_str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return u32(len(data)) + data


def pack_strv(values: list[str]) -> bytes:
    return u32(len(values)) + b"".join(pack_str(v) for v in values)


#: EXEC flags (PROTOCOL.md): keep stdin open for STDIN frames; a ``str user`` follows.
EXEC_KEEP_STDIN = 1
EXEC_AS_USER = 2
MAX_USER_BYTES = 255


def encode_exec(argv: list[str] | None, script: str | None, env: dict[str, str] | None,
                cwd: str | None, keep_stdin: bool, user: str | None = None) -> bytes:
    """An EXEC payload; ``user`` (name, uid, ``name:group``, ``uid:gid``; None or "": the
    agent's own, root) is sent only when given, so an agent without user support still
    takes every other EXEC."""
    if (argv is None) == (script is None):
        raise ValueError("exec needs exactly one of argv or script")
    mode, words = (0, list(argv)) if argv is not None else (1, [script])
    if not words:
        raise ValueError("argv must not be empty")
    env_list = [f"{k}={v}" for k, v in (env or {}).items()]
    for item in [*words, *env_list, cwd or "", user or ""]:
        if "\0" in item:
            raise ValueError(f"NUL byte in exec argument {item!r}")
    if user and len(user.encode()) > MAX_USER_BYTES:
        raise ValueError(f"exec user {user[:40]!r}… is longer than {MAX_USER_BYTES} bytes")
    flags = (EXEC_KEEP_STDIN if keep_stdin else 0) | (EXEC_AS_USER if user else 0)
    return (u32(mode) + pack_strv(words) + pack_strv(env_list) + pack_str(cwd or "")
            + u32(flags) + (pack_str(user) if user else b""))


@dataclasses.dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes


class FrameReader:
    """Incremental frame parser (the host half of PROTOCOL.md's framing rules)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Skip bytes up to the next valid header instead of failing: right after connecting,
        #: the port may still hold the tail of a frame an earlier session began.
        self.resync = True

    def feed(self, data: bytes) -> list[Frame]:
        """The whole frames ``data`` completes. What is kept between calls is at most one
        frame (header + ``MAX_PAYLOAD_BYTES``) plus ``data``."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER_BYTES:
            magic, ftype, flags, stream, length = HEADER.unpack_from(self._buf)
            (crc,) = struct.unpack_from("<I", self._buf, 12)
            if magic != MAGIC or flags or crc != zlib.crc32(bytes(self._buf[:12])):
                if self.resync:
                    # Skip to the next possible magic; keep a last byte that may start one.
                    at = self._buf.find(MAGIC, 1)
                    del self._buf[:at if at > 0 else len(self._buf) - 1]
                    continue
                raise ProtocolViolation("a malformed frame header (wrong magic, flags or CRC)")
            if length > MAX_PAYLOAD_BYTES:
                raise ProtocolViolation(f"a frame of {length} bytes (the maximum is "
                                        f"{MAX_PAYLOAD_BYTES})")
            if len(self._buf) < HEADER_BYTES + length:
                break
            frames.append(Frame(ftype, stream, bytes(self._buf[HEADER_BYTES:HEADER_BYTES + length])))
            del self._buf[:HEADER_BYTES + length]
        return frames


def decode_error(payload: bytes) -> tuple[int, str]:
    if len(payload) < 8:
        return 0, f"malformed ERROR frame {payload!r}"
    code, n = struct.unpack_from("<II", payload)
    return code, payload[8:8 + n].decode(errors="replace")


def _is_u32_str(payload: bytes) -> bool:
    """``u32``, then a ``str`` that ends exactly at the end (HELLO, ERROR)."""
    return len(payload) >= 8 and struct.unpack_from("<I", payload, 4)[0] == len(payload) - 8


#: The payload shape of every frame type the agent sends (PROTOCOL.md, "Frame types").
_AGENT_PAYLOAD_CHECKS: dict[int, tuple[str, Callable[[bytes], bool]]] = {
    FrameType.HELLO: ("u32 version, str software", _is_u32_str),
    FrameType.PONG: ("the PING payload", lambda p: True),
    FrameType.STARTED: ("u32 pid", lambda p: len(p) == 4),
    FrameType.STDOUT: ("1 to 65536 bytes", lambda p: 1 <= len(p) <= MAX_CHUNK_BYTES),
    FrameType.STDERR: ("1 to 65536 bytes", lambda p: 1 <= len(p) <= MAX_CHUNK_BYTES),
    FrameType.EXIT: ("i32 code, i32 signal", lambda p: len(p) == 8),
    FrameType.CREDIT: ("u32 bytes", lambda p: len(p) == 4),
    FrameType.FILE_DATA: ("1 to 65536 bytes", lambda p: 1 <= len(p) <= MAX_CHUNK_BYTES),
    FrameType.OK: ("u64 value", lambda p: len(p) == 8),
    FrameType.ERROR: ("u32 code, str message", _is_u32_str),
}

#: Which frames each kind of stream carries from the agent (ERROR ends any of them).
_STREAM_FRAME_TYPES = {
    "exec": {FrameType.STARTED, FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT,
             FrameType.CREDIT},
    "read": {FrameType.FILE_DATA, FrameType.OK},
    "write": {FrameType.OK},
    "ping": {FrameType.PONG},
}

_DATA_TYPES = (FrameType.STDOUT, FrameType.STDERR, FrameType.FILE_DATA)


def check_agent_frame(frame: Frame) -> str | None:
    """Why a frame from the agent breaks the protocol's payload rules (None: it does not)."""
    check = _AGENT_PAYLOAD_CHECKS.get(frame.type)
    if check is None:
        return f"a frame of type 0x{frame.type:02x}, which an agent never sends"
    shape, fits = check
    if not fits(frame.payload):
        return (f"a 0x{frame.type:02x} frame on stream {frame.stream} whose "
                f"{len(frame.payload)}-byte payload is not {shape}")
    if frame.type == FrameType.HELLO and frame.stream != 0:
        return f"a HELLO on stream {frame.stream} (HELLO belongs to stream 0)"
    return None


# --- events --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Output:
    """A chunk of a command's output: ``stream`` is ``"stdout"`` or ``"stderr"``."""
    stream: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Exit:
    """How a command ended: ``code`` when it exited, ``signal`` when a signal killed it."""
    code: int | None
    signal: int | None

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        if self.signal:
            import signal as _signal
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exit {self.code}"


class RemoteError(AgentError):
    """An ERROR frame from the agent."""

    def __init__(self, code: int, message: str, stream: int = 0):
        self.code, self.message, self.stream = code, message, stream
        super().__init__(f"guest agent: {ERROR_NAMES.get(code, code)}: {message}")


class RecentErrors:
    """The last ``limit`` ERROR frames that belong to no open stream (framing errors, unknown
    streams). Older ones are dropped and counted in ``dropped``, so a guest that floods ERROR
    frames cannot grow the host's memory. ``get``/``get_nowait`` behave as ``queue.Queue``'s."""

    def __init__(self, limit: int = MAX_UNCLAIMED_ERRORS):
        self._errors: collections.deque[RemoteError] = collections.deque(maxlen=limit)
        self._cond = threading.Condition()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._errors)

    def put(self, error: RemoteError) -> None:
        with self._cond:
            if len(self._errors) == self._errors.maxlen:
                self.dropped += 1
            self._errors.append(error)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> RemoteError:
        """The oldest kept error; ``queue.Empty`` when none comes within ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._errors, timeout):
                raise queue.Empty
            return self._errors.popleft()

    def get_nowait(self) -> RemoteError:
        return self.get(timeout=0)


class _Stream:
    """Per-stream state kept by the reader thread."""

    def __init__(self, client: "AgentClient", stream_id: int, kind: str):
        self.client = client
        self.id = stream_id
        self.kind = kind                            # "exec", "read", "write" or "ping"
        # Holds at most the credit window of data (the reader enforces it) and a last event.
        self.events: "queue.Queue[object]" = queue.Queue()
        self.started = threading.Event()
        self.pid: int | None = None
        self.finished = False
        self.send_credit = INITIAL_WINDOW_BYTES     # stdin we may still send
        self.recv_credit = INITIAL_WINDOW_BYTES     # data the agent may still send us
        self.credit_cond = threading.Condition()


class ExecProcess:
    """A command running in the guest. Iterate for events, or :meth:`wait` with callbacks."""

    def __init__(self, client: "AgentClient", stream: _Stream, keep_stdin: bool):
        self._client = client
        self._stream = stream
        self._keep_stdin = keep_stdin
        self._consumed = 0
        self._abandoned = False
        self.exit: Exit | None = None

    @property
    def stream_id(self) -> int:
        return self._stream.id

    @property
    def pid(self) -> int | None:
        """The command's pid (and process group) inside the guest, once it started."""
        self._stream.started.wait(timeout=30)
        return self._stream.pid

    def __repr__(self) -> str:
        state = self.exit.describe() if self.exit else "running"
        return f"<ExecProcess stream={self._stream.id} pid={self._stream.pid} {state}>"

    @property
    def abandoned(self) -> bool:
        """True once :meth:`abandon` gave the command up (no ``Exit`` will come)."""
        return self._abandoned

    def __enter__(self) -> "ExecProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exit is None and not self._abandoned:
            self.kill()
            try:
                self.wait(timeout=5)
            except TimeoutError:
                self.abandon("the command outlived its context manager and a SIGKILL")
            except AgentError:
                pass

    # -- output ------------------------------------------------------------------------
    def next_event(self, timeout: float | None = None) -> Output | Exit:
        """The next Output or the final Exit; TimeoutError when nothing came in time."""
        if self.exit is not None:
            return self.exit
        if self._abandoned:
            raise AgentError(f"guest command on stream {self._stream.id} was given up; "
                             "it has no exit status")
        try:
            event = self._stream.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from the guest command within {timeout} s") from None
        if isinstance(event, Output):
            self._return_credit(len(event.data))
        elif isinstance(event, Exit):
            self.exit = event
        elif isinstance(event, BaseException):
            self.exit = Exit(None, None)
            raise event
        return event

    def __iter__(self) -> Iterator[Output | Exit]:
        while self.exit is None:
            yield self.next_event()
        return

    def wait(self, timeout: float | None = None,
             on_stdout: Callable[[bytes], object] | None = None,
             on_stderr: Callable[[bytes], object] | None = None) -> Exit:
        """Block until the command ends, handing output to the callbacks as it arrives."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exit is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self.next_event(remaining)
            except TimeoutError:
                raise TimeoutError(f"the guest command did not end within {timeout} s") from None
            if isinstance(event, Output):
                callback = on_stdout if event.stream == "stdout" else on_stderr
                if callback is not None:
                    callback(event.data)
            # Output that keeps coming must not stretch the timeout.
            if deadline is not None and self.exit is None and time.monotonic() >= deadline:
                raise TimeoutError(f"the guest command did not end within {timeout} s")
        return self.exit

    def _return_credit(self, nbytes: int) -> None:
        # Returning credit in half-window steps keeps frames few and the agent busy.
        self._consumed += nbytes
        if self._consumed >= INITIAL_WINDOW_BYTES // 2 and not self._stream.finished:
            grant, self._consumed = self._consumed, 0
            self._client._grant_credit(self._stream, grant)

    # -- input and control ---------------------------------------------------------------
    def write_stdin(self, data: bytes, timeout: float | None = None) -> None:
        """Send bytes to the command's stdin, waiting for credit (flow control)."""
        if not self._keep_stdin:
            raise AgentError("this command was started without stdin=True")
        view = memoryview(data)
        while view:
            with self._stream.credit_cond:
                if not self._stream.credit_cond.wait_for(
                        lambda: self._stream.send_credit > 0 or self._stream.finished, timeout):
                    raise TimeoutError("guest command is not reading its stdin")
                if self._stream.finished:
                    raise AgentError("guest command already ended; stdin not delivered")
                n = min(len(view), self._stream.send_credit, MAX_CHUNK_BYTES)
                self._stream.send_credit -= n
            self._client._send(FrameType.STDIN, self._stream.id, bytes(view[:n]))
            view = view[n:]

    def close_stdin(self) -> None:
        if self._keep_stdin and not self._stream.finished:
            self._client._send(FrameType.STDIN, self._stream.id, b"", quiet=True)

    def signal(self, signo: int) -> None:
        """Deliver a signal to the command's process group in the guest."""
        if not self._stream.finished:
            self._client._send(FrameType.SIGNAL, self._stream.id, u32(int(signo)), quiet=True)

    def kill(self) -> None:
        self.signal(9)

    def abandon(self, reason: str = "the host stopped waiting for the command") -> None:
        """Stop waiting for the command: the agent kills its process group (if it still runs)
        and forgets the stream; no ``Exit`` will come, and output still queued is dropped."""
        if self.exit is None and not self._abandoned:
            self._abandoned = True
            self._client._abandon(self._stream, reason)


# --- client --------------------------------------------------------------------------------

class AgentClient:
    """Connection to one guest agent. Thread-safe."""

    def __init__(self, sock: socket.socket, name: str = "guest"):
        self._sock = sock
        self._name = name
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        # Streams that ended recently: a CREDIT we sent as the agent sent EXIT comes back
        # as BAD_STREAM, which is no news to anyone.
        self._recently_finished: collections.deque[int] = collections.deque(maxlen=64)
        self._ids = itertools.count(1)
        # Only the first HELLO answers ours; any later one is counted and dropped.
        self._hello: tuple[int, str] | None = None
        self._hello_seen = threading.Event()
        #: HELLO frames from the agent after the first (ignored).
        self.extra_hellos = 0
        self._session = False
        self._closed = threading.Event()
        self._closed_by_host = False
        self._close_reason = "connection closed"
        self.agent_software: str | None = None
        #: ERROR frames that belong to no open stream (framing errors, unknown streams): the
        #: last ``MAX_UNCLAIMED_ERRORS``, with a count of those dropped.
        self.unclaimed_errors = RecentErrors()
        #: Set by the owner of the VM: says why the connection died when the VM ended
        #: (e.g. "QEMU was killed by signal 9"), so callers see the cause, not just "EOF".
        self.describe_loss: Callable[[], str | None] | None = None
        #: Set by the owner of the VM: called with the reason when the connection dies while
        #: the VM still runs (the agent broke the protocol or went away), before waiting
        #: callers are woken with the error.
        self.on_connection_lost: Callable[[str], None] | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"agent-reader-{name}",
                                        daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else ("ready" if self._session else "connecting")
        return f"<AgentClient {self._name} {state} streams={len(self._streams)}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> str:
        """Why the connection is closed (meaningful once ``closed``)."""
        return self._close_reason

    # -- session -----------------------------------------------------------------------
    def handshake(self, timeout: float = 30.0) -> str:
        """Exchange HELLO frames; returns the agent's software string."""
        self._send(FrameType.HELLO, 0, u32(PROTOCOL_VERSION) + pack_str(HOST_SOFTWARE))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self._closed.is_set():
                raise AgentError(f"{self._name}: agent connection lost before HELLO: "
                                 f"{self._close_reason}")
            if self._hello_seen.wait(timeout=min(0.2, max(remaining, 0.001))):
                version, software = self._hello
                break
            if remaining <= 0:
                raise TimeoutError(f"{self._name}: no HELLO from the guest agent "
                                   f"within {timeout} s")
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"guest agent ({software}) speaks protocol version {version}, this host speaks "
                f"version {PROTOCOL_VERSION}: rebuild the guest image with "
                "`python -m supermachine_jupyter assets`")
        self.agent_software = software
        self._session = True
        return software

    def close(self, reason: str = "closed by the host") -> None:
        if not self._closed.is_set():
            self._close_reason = reason
            self._closed_by_host = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=2)

    # -- requests ------------------------------------------------------------------------
    def exec(self, argv: list[str] | None = None, *, script: str | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: bool | bytes = False, user: str | None = None) -> ExecProcess:
        """Start a command; ``stdin=True`` keeps stdin open, bytes are sent then closed;
        ``user`` runs it as that user of the guest's /etc/passwd (see ``encode_exec``)."""
        payload = encode_exec(argv, script, env, cwd, keep_stdin=stdin is not False, user=user)
        stream = self._open_stream("exec")
        proc = ExecProcess(self, stream, keep_stdin=stdin is not False)
        self._send(FrameType.EXEC, stream.id, payload)
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            def feed() -> None:
                try:
                    proc.write_stdin(bytes(stdin))
                    proc.close_stdin()
                except AgentError:
                    pass
            threading.Thread(target=feed, name="agent-stdin", daemon=True).start()
        return proc

    def ping(self, payload: bytes = b"", timeout: float = 10.0) -> float:
        """Round trip through the agent; returns seconds."""
        stream = self._open_stream("ping")
        started = time.monotonic()
        self._send(FrameType.PING, stream.id, payload)
        event = self._wait_final(stream, timeout)
        if not isinstance(event, Frame) or event.payload != payload:
            raise AgentError(f"bad PONG: {event!r}")
        return time.monotonic() - started

    def write_file(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 60.0) -> int:
        """Create or replace a guest file with ``data`` (sent in chunks)."""
        chunk = MAX_PAYLOAD_BYTES - 4096
        offset, first = 0, True
        while first or offset < len(data):
            piece = data[offset:offset + chunk]
            stream = self._open_stream("write")
            self._send(FrameType.WRITE_FILE, stream.id,
                       u32(0 if first else 1) + u32(mode) + pack_str(path) + piece)
            self._wait_final(stream, timeout)
            offset += len(piece)
            first = False
        return len(data)

    def read_file(self, path: str, timeout: float = 60.0,
                  max_bytes: int = DEFAULT_READ_LIMIT_BYTES) -> bytes:
        """A guest file's contents (a regular file: the agent refuses FIFOs and devices).

        A file larger than ``max_bytes`` raises :class:`AgentError` naming the path and the
        limit; the agent is told to stop (the stream is given up), nothing more is kept."""
        stream = self._open_stream("read")
        self._send(FrameType.READ_FILE, stream.id, pack_str(path))
        chunks, consumed, total = [], 0, 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = stream.events.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                self._abandon(stream, f"read_file {path}: no answer within {timeout} s")
                raise TimeoutError(f"read_file {path}: no answer within {timeout} s") from None
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Output):
                total += len(event.data)
                if total > max_bytes:
                    self._abandon(stream, f"read_file {path}: larger than max_bytes={max_bytes}")
                    raise AgentError(f"read_file {path}: the file is larger than max_bytes="
                                     f"{max_bytes} bytes; pass a larger max_bytes, or read it "
                                     "in pieces with a command (head -c, split)")
                chunks.append(event.data)
                consumed += len(event.data)
                if consumed >= INITIAL_WINDOW_BYTES // 2:
                    self._grant_credit(stream, consumed)
                    consumed = 0
            elif isinstance(event, Frame):   # OK
                return b"".join(chunks)

    def poweroff(self) -> None:
        """Ask the guest to sync and end the VM (no answer: the guest goes away)."""
        self._send(FrameType.POWEROFF, 0, b"")

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests: malformed frames)."""
        with self._write_lock:
            self._sock.sendall(data)

    # -- internals -----------------------------------------------------------------------
    def _open_stream(self, kind: str) -> _Stream:
        if self._closed.is_set():
            raise AgentError(f"{self._name}: agent connection is closed ({self._close_reason})")
        with self._lock:
            while True:
                sid = next(self._ids) & 0xFFFFFFFF
                if sid and sid not in self._streams and sid not in self._recently_finished:
                    break
            stream = _Stream(self, sid, kind)
            self._streams[sid] = stream
        return stream

    def _wait_final(self, stream: _Stream, timeout: float) -> object:
        try:
            event = stream.events.get(timeout=timeout)
        except queue.Empty:
            with self._lock:
                self._streams.pop(stream.id, None)
            raise TimeoutError(f"{self._name}: no answer from the guest agent within "
                               f"{timeout} s") from None
        if isinstance(event, BaseException):
            raise event
        return event

    def _grant_credit(self, stream: _Stream, nbytes: int) -> None:
        """Let the agent send ``nbytes`` more data on ``stream`` (counted before it is sent,
        so the agent can never be ahead of what the reader allows)."""
        with stream.credit_cond:
            stream.recv_credit += nbytes
        self._send(FrameType.CREDIT, stream.id, u32(nbytes), quiet=True)

    def _abandon(self, stream: _Stream, reason: str) -> None:
        """Give a stream up: forget it here, and tell the agent (an ERROR on the stream makes
        it kill the command or close the file, and send nothing more on it)."""
        with self._lock:
            if self._streams.pop(stream.id, None) is None:
                return
            self._recently_finished.append(stream.id)
        stream.finished = True
        with stream.credit_cond:
            stream.credit_cond.notify_all()
        self._send(FrameType.ERROR, stream.id,
                   u32(ErrorCode.FLOW) + pack_str(reason.encode()[:400]), quiet=True)

    def _send(self, frame_type: int, stream: int, payload: bytes, quiet: bool = False) -> None:
        data = encode_frame(frame_type, stream, payload)
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as exc:
            if quiet:
                return
            raise AgentError(f"{self._name}: cannot send to the guest agent: {exc}") from exc

    def _finish(self, stream: _Stream, event: object) -> None:
        stream.finished = True
        stream.started.set()
        with stream.credit_cond:
            stream.credit_cond.notify_all()
        with self._lock:
            self._streams.pop(stream.id, None)
            self._recently_finished.append(stream.id)
        stream.events.put(event)

    def _read_loop(self) -> None:
        reader = FrameReader()
        violation = False
        try:
            while True:
                data = self._sock.recv(262144)
                if not data:
                    self._close_reason = "the guest agent closed the connection"
                    break
                for frame in reader.feed(data):
                    if frame.type == FrameType.HELLO:
                        reader.resync = False   # from here on the stream must be clean
                    self._dispatch(frame)
        except ProtocolViolation as exc:
            violation = True
            if not self._closed_by_host:
                self._close_reason = f"the guest agent broke the protocol: it sent {exc}"
        except (OSError, AgentError) as exc:
            if not self._closed_by_host:
                self._close_reason = f"agent connection failed: {exc}"
        finally:
            self._connection_ended(lost=not self._closed_by_host, violation=violation)

    def _connection_ended(self, lost: bool, violation: bool) -> None:
        vm_ended = False
        if lost:
            # Hang up: a guest that broke the protocol gets no more of our attention.
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if lost and not violation and self.describe_loss is not None:
            try:
                cause = self.describe_loss()
            except Exception:  # noqa: BLE001 - keep the plain reason
                cause = None
            if cause:
                vm_ended = True
                self._close_reason = f"the VM ended: {cause}"
        self._closed.set()
        if lost and not vm_ended and self.on_connection_lost is not None:
            try:
                self.on_connection_lost(self._close_reason)
            except Exception:  # noqa: BLE001 - the streams must still be woken
                pass
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.finished = True
            with stream.credit_cond:
                stream.credit_cond.notify_all()
            stream.events.put(AgentError(f"{self._name}: {self._close_reason}"))

    def _dispatch(self, frame: Frame) -> None:
        problem = check_agent_frame(frame)
        if problem:
            raise ProtocolViolation(problem)
        if frame.type == FrameType.HELLO:
            if self._hello is None:
                version, n = struct.unpack_from("<II", frame.payload)
                self._hello = (version, frame.payload[8:8 + n].decode(errors="replace"))
                self._hello_seen.set()
            else:
                self.extra_hellos += 1
            return
        with self._lock:
            stream = self._streams.get(frame.stream)
        if frame.type == FrameType.ERROR:
            code, message = decode_error(frame.payload)
            error = RemoteError(code, message, frame.stream)
            if stream is None:
                if code == ErrorCode.BAD_STREAM and frame.stream in self._recently_finished:
                    return
                self.unclaimed_errors.put(error)
            else:
                self._finish(stream, error)
            return
        if stream is None:
            return  # a stream we gave up on (timeout, abandon) or of an earlier session
        if frame.type not in _STREAM_FRAME_TYPES[stream.kind]:
            raise ProtocolViolation(f"a 0x{frame.type:02x} frame on stream {stream.id}, "
                                    f"which is a {stream.kind} stream")
        if frame.type in _DATA_TYPES:
            with stream.credit_cond:
                stream.recv_credit -= len(frame.payload)
                beyond = -stream.recv_credit
            if beyond > 0:
                raise ProtocolViolation(
                    f"{beyond} bytes of output on stream {stream.id} beyond the credit the "
                    f"host granted (flow control: {INITIAL_WINDOW_BYTES} bytes, then what "
                    "CREDIT frames return)")
            kind = "stderr" if frame.type == FrameType.STDERR else "stdout"
            stream.events.put(Output(kind, frame.payload))
        elif frame.type == FrameType.STARTED:
            (stream.pid,) = struct.unpack("<I", frame.payload)
            stream.started.set()
        elif frame.type == FrameType.EXIT:
            code, sig = struct.unpack("<ii", frame.payload)
            stream.started.set()
            self._finish(stream, Exit(None if sig else code, sig or None))
        elif frame.type == FrameType.CREDIT:
            with stream.credit_cond:
                stream.send_credit += struct.unpack("<I", frame.payload)[0]
                stream.credit_cond.notify_all()
        else:   # OK, PONG
            self._finish(stream, frame)
