"""The host's agent client against a scripted peer on a socketpair: framing, flow control
and hostile frames, with no VM (tests/test_agent_protocol.py runs the real C agent)."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

import pytest

from supermachine_jupyter.errors import AgentError
from supermachine_jupyter.guest.agent import (HEADER_BYTES, INITIAL_WINDOW_BYTES, AgentClient,
                                              FrameReader, FrameType, encode_frame, pack_str,
                                              u32)


def hello() -> bytes:
    return encode_frame(FrameType.HELLO, 0, u32(1) + pack_str("scripted peer"))


@pytest.fixture
def pair():
    """(client, peer socket): a client whose session is open."""
    host, peer = socket.socketpair()
    client = AgentClient(host, name="unit")
    peer.sendall(hello())
    client.handshake(timeout=5)
    peer.recv(65536)                       # the host's HELLO
    yield client, peer
    client.close()
    peer.close()


def read_frames(peer: socket.socket, count: int, timeout: float = 5.0) -> list:
    reader, frames = FrameReader(), []
    reader.resync = False
    peer.settimeout(timeout)
    while len(frames) < count:
        frames += reader.feed(peer.recv(65536))
    return frames


def test_frames_split_anywhere_are_reassembled():
    frame = encode_frame(FrameType.STDOUT, 7, b"x" * 1000)
    reader = FrameReader()
    reader.resync = False
    frames = []
    for i in range(0, len(frame), 3):
        frames += reader.feed(frame[i:i + 3])
    assert [(f.type, f.stream, f.payload) for f in frames] == [(FrameType.STDOUT, 7, b"x" * 1000)]


def test_a_bad_header_checksum_is_refused_once_the_session_is_clean():
    frame = bytearray(encode_frame(FrameType.PONG, 1, b"p"))
    frame[12] ^= 0xFF
    reader = FrameReader()
    reader.resync = False
    with pytest.raises(AgentError, match="malformed frame header"):
        reader.feed(bytes(frame))


def test_resync_skips_the_tail_of_an_earlier_session():
    reader = FrameReader()
    frames = reader.feed(b"\x00garbage-from-before" + encode_frame(FrameType.PONG, 3, b"ok"))
    assert [(f.type, f.stream) for f in frames] == [(FrameType.PONG, 3)]


def test_an_oversized_length_is_refused_before_buffering():
    head = struct.pack("<2sBBII", b"SM", FrameType.STDOUT, 0, 1, 64 * 1024 * 1024)
    reader = FrameReader()
    reader.resync = False
    with pytest.raises(AgentError, match=r"a frame of 67108864 bytes \(the maximum is 1048576\)"):
        reader.feed(head + struct.pack("<I", zlib.crc32(head)))


def test_exec_output_and_exit_arrive_in_order(pair):
    client, peer = pair
    proc = client.exec(["echo", "hi"])
    (exec_frame,) = read_frames(peer, 1)
    assert exec_frame.type == FrameType.EXEC
    sid = exec_frame.stream
    peer.sendall(encode_frame(FrameType.STARTED, sid, u32(42))
                 + encode_frame(FrameType.STDOUT, sid, b"hi\n")
                 + encode_frame(FrameType.EXIT, sid, struct.pack("<ii", 0, 0)))
    out = []
    status = proc.wait(timeout=5, on_stdout=out.append)
    assert (status.code, status.signal, b"".join(out), proc.pid) == (0, None, b"hi\n", 42)


def test_output_beyond_the_credit_breaks_the_connection(pair):
    client, peer = pair
    proc = client.exec(["yes"])
    (exec_frame,) = read_frames(peer, 1)
    sid = exec_frame.stream
    chunk = encode_frame(FrameType.STDOUT, sid, b"y" * 65536)
    peer.sendall(encode_frame(FrameType.STARTED, sid, u32(1)))
    for _ in range(INITIAL_WINDOW_BYTES // 65536 + 1):     # one chunk past the window
        peer.sendall(chunk)
    deadline = time.monotonic() + 5
    while not client.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.closed
    with pytest.raises(AgentError, match="beyond the credit"):
        proc.wait(timeout=5)


def test_forged_hellos_and_stray_errors_stay_bounded(pair):
    client, peer = pair
    stray = encode_frame(FrameType.ERROR, 999, u32(4) + pack_str("no such stream"))
    sender = threading.Thread(target=lambda: peer.sendall((hello() + stray) * 20000))
    sender.start()
    sender.join(20)
    deadline = time.monotonic() + 10
    while client.extra_hellos < 20000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.extra_hellos == 20000 and not client.closed
    assert len(client.unclaimed_errors) <= 256
    assert client.unclaimed_errors.dropped >= 20000 - 256


def test_frames_header_is_sixteen_bytes():
    assert len(encode_frame(FrameType.PING, 0)) == HEADER_BYTES


def test_exec_user_is_sent_only_when_given():
    """EXEC flags bit 1 and the user string (PROTOCOL.md): absent without a user, so an agent
    that predates them still takes every other EXEC."""
    from supermachine_jupyter.guest.agent import encode_exec, pack_str, u32
    plain = encode_exec(["id"], None, None, None, False)
    assert plain.endswith(u32(0))
    assert encode_exec(["id"], None, None, None, True, user="") == plain[:-4] + u32(1)
    assert encode_exec(["id"], None, None, None, True, user="alice:staff") == \
        plain[:-4] + u32(3) + pack_str("alice:staff")
    with pytest.raises(ValueError, match="NUL"):
        encode_exec(["id"], None, None, None, False, user="ro\0ot")
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        encode_exec(["id"], None, None, None, False, user="u" * 256)
