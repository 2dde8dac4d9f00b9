"""Queue notifies through KVM ioeventfds ("doorbells"), on real KVM with probe guests.

A guest's 4-byte write of a live queue's index to QueueNotify signals an eventfd inside KVM;
the core's event loop hands it to the transport, which runs the device's notify as the MMIO
exit would have. The transport's counters tell the two paths apart: ``queue_notifications``
counts every notify, ``doorbell_notifications`` those that came without a vCPU exit. Every
other write to QueueNotify (another value or size, a queue not live) must still exit and get
the MMIO path's answer; ``queue_notify_exits=True`` turns doorbells off (the fallback when KVM
has no ioeventfds).
"""

from __future__ import annotations

import pytest

PROBE_TIMEOUT_S = 30
DISK_BYTES = 1 << 20
BLK_FIRST_ROUND_NOTIFIES = 5      # write, flush, read, get-id, read past the end


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK_BYTES))
    return path


def _run_blk(native, disk, **kwargs):
    vm, out = native.run_probe("blk", timeout=PROBE_TIMEOUT_S, volumes=[(disk, False)], **kwargs)
    out = out.decode(errors="replace")
    try:
        assert "PROBE blk OK" in out, out
        assert vm.exit_info()["reason"] == "guest_reset"
        device = vm.device("virtio-blk0")
    finally:
        vm.close()
    assert not device["broken"], device["broken_reason"]
    return out, device["counters"]


def _checksum(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("checksum "))


def test_notifies_ring_the_doorbell_without_an_exit(native, disk):
    _, c = _run_blk(native, disk)
    assert c["queue_notifications"] == BLK_FIRST_ROUND_NOTIFIES
    assert c["doorbell_notifications"] == BLK_FIRST_ROUND_NOTIFIES   # none took the exit
    assert c["stale_doorbells"] == 0
    assert (c["write_requests"], c["flush_requests"], c["read_requests"]) == (1, 1, 2)


def test_without_doorbells_every_notify_exits_with_the_same_outcome(native, disk, tmp_path):
    out, c = _run_blk(native, disk, queue_notify_exits=True)
    assert c["queue_notifications"] == BLK_FIRST_ROUND_NOTIFIES
    assert c["doorbell_notifications"] == 0
    other = tmp_path / "other.img"
    other.write_bytes(bytes(DISK_BYTES))
    with_doorbells, _ = _run_blk(native, other)
    assert _checksum(out) == _checksum(with_doorbells)


def test_reset_disarms_the_doorbells_and_driver_ok_arms_them_again(native, disk):
    # reset=1: after the first round the probe resets the device, notifies queue 0 while it is
    # reset (that write must exit: the transport ignores it, as before), sets the queue up
    # again and reads the first round back through a doorbell armed anew.
    out, c = _run_blk(native, disk, cmdline="reset=1")
    assert "reset round done" in out, out
    assert c["queue_notifications"] == BLK_FIRST_ROUND_NOTIFIES + 2
    assert c["doorbell_notifications"] == BLK_FIRST_ROUND_NOTIFIES + 1
    assert c["queue_notifications"] - c["doorbell_notifications"] == 1   # the reset queue's
    assert c["read_requests"] == 3 and c["stale_doorbells"] == 0
