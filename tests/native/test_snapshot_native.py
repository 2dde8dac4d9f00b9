"""Native-core snapshots: sm_vm_snapshot / sm_vm_restore through NativeVm.snapshot/restore.

The counter probe counts in guest RAM and prints "COUNT <n>" every `every=` iterations; with
fill=<pages> it also fills guest pages with a pattern and re-checks them while counting. A VM
restored from a snapshot must continue from the snapshot's count (never print the probe's
READY line again), two restores must run independently, guest RAM must be shared with the
snapshot file copy-on-write, and any damaged snapshot must be refused with "snapshot" in the
error.

Virtio devices travel with the snapshot (format version 2): the balloon and blk probes stop at
a snapshot point (snap=1), and every restore must carry on with a second round of I/O on the
same queues, at the ring positions where the snapshot left them. A restored vsock has no
connections and sends the guest a transport reset. virtio-fs keeps the guest's FUSE session
(format version 4: node ids and open files as paths after the device records): the fs probe
holds node ids and handles across the snapshot point and uses them again after a restore.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.helpers import accept_one_connection

COUNT_RE = re.compile(rb"COUNT (\d+)\n")
EVERY = 2000
SNAPSHOT_AT = 20000          # K: the original has printed at least this count at snapshot time
FILL_PAGES = 2048            # 8 MiB of patterned guest RAM in the snapshot
MEMORY_MIB = 32
HEADER = struct.Struct("<8sIIQIIQQII")  # sm_snapshot_header (native/src/snapshot.h)
VERSION_OFFSET = 8
PAYLOAD_OFFSET = 32
CHECKSUM_OFFSET = 40
FORMAT_VERSION = 4
# sm_virtio_mmio_state (native/src/devices/virtio_mmio.h): one per device at the end of state.bin
DEVICE_RECORD_BYTES = 736
RECORD_QUEUES_OFFSET = 344        # sm_vq_state[4], 32 bytes each: size, ready, next_avail, next_used, GPAs
QUEUE_STATE_BYTES = 32
RECORD_BLOB_LEN_OFFSET = 472
RECORD_EXTRA_LEN_OFFSET = 476     # extra state (virtio-fs sessions), after all the records
RECORD_BLOB_OFFSET = 480
BALLOON_STATE = struct.Struct("<IIIHBBQ")  # sm_balloon_state head (virtio_balloon.h)
FNV_OFFSET_BASIS = 0xcbf29ce484222325
FNV_PRIME = 0x100000001b3


def counts(output: bytes) -> list[int]:
    return [int(m) for m in COUNT_RE.findall(output)]


def wait_counts(vm, n: int, timeout: float = 120.0) -> list[int]:
    """Wait until vm printed at least n COUNT lines; returns them all."""
    deadline = time.monotonic() + timeout
    while True:
        found = counts(vm.console_output())
        if len(found) >= n:
            return found
        vm.raise_if_failed()
        assert time.monotonic() < deadline, f"{len(found)} COUNT lines after {timeout}s: {vm.console_output()[-300:]!r}"
        time.sleep(0.02)


def smaps_of(path: Path) -> dict[str, int]:
    """kB totals over this process's mappings of path (/proc/self/smaps)."""
    totals: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    totals[parts[0][:-1]] = totals.get(parts[0][:-1], 0) + int(parts[1])
    return totals


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def snapshot_dir(native, tmp_path_factory):
    """A snapshot of a counter VM taken once it printed COUNT >= SNAPSHOT_AT; the original
    keeps counting afterwards (checked here)."""
    d = tmp_path_factory.mktemp("snap") / "counter"
    vm = native.NativeVm(str(native.probe_path("counter")), memory_mib=MEMORY_MIB, vcpus=2,
                         cmdline=f"every={EVERY} fill={FILL_PAGES}")
    try:
        vm.start()
        vm.wait_for_console(f"COUNT {SNAPSHOT_AT}\n".encode(), 120)
        vm.snapshot(d)
        assert vm.state == "running"  # the snapshot paused it and put it back
        before = counts(vm.console_output())[-1]
        deadline = time.monotonic() + 60
        while counts(vm.console_output())[-1] < before + 5 * EVERY:
            assert time.monotonic() < deadline, "the original VM stopped counting after the snapshot"
            time.sleep(0.02)
        assert b"FILL BAD" not in vm.console_output()
    finally:
        vm.close()
    return d


def test_snapshot_files(snapshot_dir):
    state = (snapshot_dir / "state.bin").read_bytes()
    (magic, version, header_bytes, memory_bytes, n_vcpus, _flags, payload, _sum, n_devices,
     record_bytes) = HEADER.unpack_from(state)
    assert magic == b"SMNSNAP\0" and version == FORMAT_VERSION and header_bytes == HEADER.size
    assert memory_bytes == MEMORY_MIB << 20 and n_vcpus == 2
    assert n_devices == 0 and record_bytes == DEVICE_RECORD_BYTES
    assert len(state) == HEADER.size + payload
    memory = snapshot_dir / "memory.bin"
    st = memory.stat()
    assert st.st_size == MEMORY_MIB << 20
    # sparse: the fill pages and the probe are on disk, the zero rest of guest RAM is holes
    assert FILL_PAGES * 4096 <= st.st_blocks * 512 < (MEMORY_MIB << 20) * 3 // 4


def test_two_restores_continue_from_snapshot_independently(native, snapshot_dir):
    memory = snapshot_dir / "memory.bin"
    digest = sha256(memory)
    r1 = native.NativeVm.restore(snapshot_dir)
    r2 = native.NativeVm.restore(snapshot_dir)
    try:
        for r in (r1, r2):
            seen = wait_counts(r, 5)
            out = r.console_output()
            assert b"PROBE counter READY" not in out, "the restored guest started over"
            assert seen[0] >= SNAPSHOT_AT, f"restored VM counts from {seen[0]}, not from >= {SNAPSHOT_AT}"
            assert seen == sorted(seen) and seen[0] <= SNAPSHOT_AT + 4 * EVERY
            assert b"FILL BAD" not in out, "guest RAM differs from the snapshot"
        # independent: stopping one does not stop the other
        r1.pause()
        frozen = counts(r1.console_output())[-1]
        base = counts(r2.console_output())[-1]
        deadline = time.monotonic() + 60
        while counts(r2.console_output())[-1] < base + 5 * EVERY:
            assert time.monotonic() < deadline, "r2 stopped counting while r1 was paused"
            time.sleep(0.02)
        assert counts(r1.console_output())[-1] == frozen
        r1.resume()
        wait_counts(r1, len(counts(r1.console_output())) + 2)
        assert r1.state == "running" and r2.state == "running"
    finally:
        r1.close()
        r2.close()
    # guest writes went to private copies, never into the snapshot file
    assert sha256(memory) == digest


def test_restored_vms_share_guest_ram(native, snapshot_dir):
    memory = (snapshot_dir / "memory.bin").resolve()
    vms = [native.NativeVm.restore(snapshot_dir) for _ in range(3)]
    try:
        for vm in vms:
            wait_counts(vm, 10)
        usage = smaps_of(memory)
        print(f"\n3 restored VMs, memory.bin mappings: {usage}")
        assert usage.get("Size", 0) == 3 * (MEMORY_MIB << 10)
        # only the pages the guests wrote (counter, stack, page-table A/D bits) are private
        assert usage.get("Private_Dirty", 0) < 3 * 1024, usage
        # the 8 MiB of fill the guests read is not copied per VM
        assert usage.get("Private_Dirty", 0) < FILL_PAGES * 4 // 4
        for vm in vms:
            assert b"FILL BAD" not in vm.console_output()
    finally:
        for vm in vms:
            vm.close()


def test_restore_created_then_start(native, snapshot_dir):
    vm = native.NativeVm.restore(snapshot_dir, start=False)
    try:
        assert vm.state == "created"
        assert vm.vcpu_regs(0)["cs_long_mode"] == 1  # vCPU state is loaded before start
        vm.start()
        assert wait_counts(vm, 3)[0] >= SNAPSHOT_AT
    finally:
        vm.close()


def _copy(snapshot_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(snapshot_dir, d)
    return d


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, why", [
    ("truncate_state", "truncated"),
    ("truncate_header", "truncated"),
    ("corrupt_payload", "corrupted"),
    ("corrupt_header_flags", "corrupted"),
    ("bad_magic", "magic"),
    ("other_version", "version"),
    ("truncate_memory", "memory.bin"),
    ("missing_memory", "memory.bin"),
    ("missing_dir", "cannot be opened"),
])
def test_damaged_snapshot_refused(native, snapshot_dir, tmp_path, damage, why):
    d = _copy(snapshot_dir, tmp_path)
    state, memory = d / "state.bin", d / "memory.bin"
    size = state.stat().st_size
    if damage == "truncate_state":
        state.write_bytes(state.read_bytes()[: size // 2])
    elif damage == "truncate_header":
        state.write_bytes(state.read_bytes()[:20])
    elif damage == "corrupt_payload":
        _patch(state, size - 100, bytes([state.read_bytes()[size - 100] ^ 0xFF]))
    elif damage == "corrupt_header_flags":
        _patch(state, 28, struct.pack("<I", 0x80))
    elif damage == "bad_magic":
        _patch(state, 0, b"NOTSNAP\0")
    elif damage == "other_version":
        _patch(state, VERSION_OFFSET, struct.pack("<I", 99))
    elif damage == "truncate_memory":
        with open(memory, "r+b") as f:
            f.truncate((MEMORY_MIB << 20) // 2)
    elif damage == "missing_memory":
        memory.unlink()
    elif damage == "missing_dir":
        d = tmp_path / "nothing-here"
    with pytest.raises(native.NativeCoreError) as info:
        native.NativeVm.restore(d)
    message = str(info.value)
    assert "snapshot" in message and why in message, message


def test_snapshot_needs_a_started_vm(native, tmp_path):
    vm = native.NativeVm(str(native.probe_path("counter")), memory_mib=MEMORY_MIB)
    try:
        with pytest.raises(native.NativeCoreError, match="snapshot.*created"):
            vm.snapshot(tmp_path / "s")
    finally:
        vm.close()


def test_snapshot_of_a_restored_vm(native, snapshot_dir, tmp_path):
    """A restored VM (guest RAM copy-on-write from the first snapshot) snapshots again; the
    second restore continues from the second snapshot, not the first."""
    first = native.NativeVm.restore(snapshot_dir)
    try:
        reached = wait_counts(first, 20)[-1]
        first.snapshot(tmp_path / "second")
    finally:
        first.close()
    second = native.NativeVm.restore(tmp_path / "second")
    try:
        seen = wait_counts(second, 3)
        assert seen[0] >= reached > SNAPSHOT_AT
        assert b"FILL BAD" not in second.console_output()
    finally:
        second.close()


def test_snapshot_of_a_halted_vcpu(native, tmp_path):
    """The idle probe halts with interrupts off (vCPU blocked in the kernel's HLT): it pauses,
    snapshots and restores into a VM that stays halted without failing."""
    vm = native.NativeVm(str(native.probe_path("idle")), memory_mib=MEMORY_MIB)
    try:
        vm.start()
        vm.wait_for_console(b"PROBE idle READY", 60)
        time.sleep(0.1)
        vm.snapshot(tmp_path / "idle")
    finally:
        vm.close()
    restored = native.NativeVm.restore(tmp_path / "idle")
    try:
        time.sleep(0.3)
        assert restored.state == "running", restored.exit_info()
        restored.pause()
        regs = restored.vcpu_regs(0)
        assert regs["rflags"] & 0x200 == 0  # still in the interrupts-off halt loop
        assert restored.console_output() == b""
    finally:
        restored.close()


# -- virtio devices ----------------------------------------------------------------------------
PROBE_TIMEOUT_S = 60
SNAPSHOT_POINT = b" SNAPSHOT-POINT\n"
BALLOON_TARGET = 64                # pages; the probe deflates half of them before the snapshot point
# The first statistics poll comes STATS_S after the VM is created; the probe's snapshot point
# follows it at once, so the next poll is due well after the snapshot: the device holds the
# refilled statistics buffer in it, and a restore hands it back on its own re-armed timer.
STATS_S = 2
BALLOON_DEVICES = {"balloon": True, "balloon_deflate_on_oom": True, "balloon_stats_interval_s": STATS_S}
DISK_BYTES = 1 << 20
DISK_SERIAL = "vol-snap"
BLK_SEED = 7
SECTOR = 512
POSITIONS_RE = re.compile(r"queue positions inflate=(\d+) deflate=(\d+) stats=(\d+)")


def fnv1a(data: bytes, h: int = FNV_OFFSET_BASIS) -> int:
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def device_record_offset(state: bytes, index: int) -> int:
    header = HEADER.unpack_from(state)
    n_devices, record_bytes = header[8], header[9]
    assert record_bytes == DEVICE_RECORD_BYTES and index < n_devices
    return len(state) - (n_devices - index) * record_bytes


def reseal(path: Path) -> None:
    """Recompute state.bin's checksum, so a patched field reaches the check it is aimed at."""
    raw = bytearray(path.read_bytes())
    raw[CHECKSUM_OFFSET:CHECKSUM_OFFSET + 8] = bytes(8)
    raw[CHECKSUM_OFFSET:CHECKSUM_OFFSET + 8] = struct.pack("<Q", fnv1a(bytes(raw)))
    path.write_bytes(bytes(raw))


def run_to_snapshot_point(vm, name: str) -> str:
    vm.start()
    out = vm.wait_for_console(b"PROBE " + name.encode() + SNAPSHOT_POINT, PROBE_TIMEOUT_S).decode()
    assert f"PROBE {name} SNAPSHOT-POINT" in out, out
    return out


def continue_to_ok(vm, name: str) -> str:
    """Send the byte the probe waits for at its snapshot point; its second round must pass."""
    vm.console_write(b"x")
    assert vm.wait(PROBE_TIMEOUT_S) == "stopped", vm.console_output()[-500:]
    out = vm.console_output().decode()
    info = vm.exit_info()
    assert f"PROBE {name} OK" in out and info["reason"] == "guest_reset", (out, info)
    return out


@pytest.fixture(scope="module")
def balloon_snapshot(native, tmp_path_factory):
    d = tmp_path_factory.mktemp("snap") / "balloon"
    vm = native.NativeVm(native.probe_path("balloon"), memory_mib=64, cmdline="snap=1",
                         strict_unhandled_exits=True, **BALLOON_DEVICES)
    try:
        vm.balloon_set_target_pages(BALLOON_TARGET)
        out = run_to_snapshot_point(vm, "balloon")
        vm.snapshot(d)
    finally:
        vm.close()
    assert POSITIONS_RE.search(out).groups() == ("1", "1", "1"), out
    return d


def test_balloon_snapshot_record(balloon_snapshot):
    """The balloon's record: transport registers, queues and the device's own state."""
    state = (balloon_snapshot / "state.bin").read_bytes()
    assert HEADER.unpack_from(state)[8] == 1
    rec = device_record_offset(state, 0)
    assert state[rec:rec + 15] == b"virtio-balloon\0"
    size, ready, next_avail, next_used = struct.unpack_from("<4H", state, rec + RECORD_QUEUES_OFFSET)
    assert (size, ready, next_avail, next_used) == (64, 1, 1, 1)  # inflate queue
    blob_len, = struct.unpack_from("<I", state, rec + RECORD_BLOB_LEN_OFFSET)
    target, actual, interval, stats_head, held, deflate_on_oom, present = BALLOON_STATE.unpack_from(
        state, rec + RECORD_BLOB_OFFSET)
    assert blob_len == BALLOON_STATE.size + 10 * 8
    assert (target, actual, interval) == (BALLOON_TARGET, BALLOON_TARGET // 2, STATS_S)
    assert held == 1 and stats_head == 0 and deflate_on_oom == 1 and present == (1 << 10) - 1


def test_balloon_restores_continue_on_the_same_queues(native, balloon_snapshot):
    """Two VMs restored from one snapshot each carry on: target/actual and the last statistics
    come back, the held statistics buffer is handed back by the re-armed timer, and the second
    round of inflation answers on the rings where the snapshot left them."""
    restored = [native.NativeVm.restore(balloon_snapshot, start=False, **BALLOON_DEVICES)
                for _ in range(2)]
    new_targets = (BALLOON_TARGET + 32, BALLOON_TARGET + 64)
    try:
        for vm, new_target in zip(restored, new_targets):
            stats = vm.balloon_stats()
            assert (stats["target_pages"], stats["actual_pages"]) == (BALLOON_TARGET, BALLOON_TARGET // 2)
            assert stats["swap_in"] == 1001 and stats["total_memory"] == 64 << 20
            vm.balloon_set_target_pages(new_target)
            vm.start()
        outs = [continue_to_ok(vm, "balloon") for vm in restored]
        for vm, out, new_target in zip(restored, outs, new_targets):
            extra = new_target - BALLOON_TARGET // 2
            assert "features accepted" not in out  # carried on, did not start over
            assert f"target pages {new_target}\ninflated pages {extra} nonzero-after-release 0" in out
            # the guest's rings moved on by exactly the second round: one inflate, one stats
            assert POSITIONS_RE.search(out).groups() == ("2", "1", "2"), out
            stats = vm.balloon_stats()
            assert (stats["target_pages"], stats["actual_pages"]) == (new_target, new_target)
            assert stats["swap_in"] == 1002  # the second round's statistics
            device = vm.device("virtio-balloon")
            c = device["counters"]  # counters count from the restore
            assert not device["broken"], device["broken_reason"]
            assert (c["inflate_requests"], c["inflated_pages"], c["deflate_requests"]) == (1, extra, 0)
            assert c["stats_updates"] == 1 and c["stats_requests"] >= 1 and c["errors"] == 0
    finally:
        for vm in restored:
            vm.close()


@pytest.mark.parametrize("change, why", [
    ("no_balloon", r"snapshot device list differs.*\[virtio-balloon\].*\[\]"),
    ("extra_vsock", r"snapshot device list differs.*\[virtio-balloon\].*\[virtio-balloon, virtio-vsock\]"),
    ("deflate_on_oom", r"snapshot restore: virtio-balloon: deflate_on_oom differs \(snapshot 1, restore config 0\)"),
    ("stats_interval", r"snapshot restore: virtio-balloon: statistics interval differs"),
])
def test_restore_with_other_devices_refused(native, balloon_snapshot, short_tmp, change, why):
    devices = {
        "no_balloon": {},
        "extra_vsock": dict(BALLOON_DEVICES, vsock_uds_path=short_tmp / "v.sock"),
        "deflate_on_oom": dict(BALLOON_DEVICES, balloon_deflate_on_oom=False),
        "stats_interval": dict(BALLOON_DEVICES, balloon_stats_interval_s=STATS_S + 1),
    }[change]
    with pytest.raises(native.NativeCoreError, match=why):
        native.NativeVm.restore(balloon_snapshot, **devices)


@pytest.mark.parametrize("damage, why", [
    ("truncated_record", "snapshot is truncated"),
    ("queue_size", r"snapshot restore: virtio-balloon: queue 0: .*above QueueNumMax"),
    ("queue_outside_ram", r"snapshot restore: virtio-balloon: queue 1: .*outside guest RAM"),
    ("blob_length", r"snapshot layout is invalid.*device record 0: device state length above"),
    ("blob_length_for_device", r"snapshot restore: virtio-balloon: balloon state is 8 bytes"),
    ("extra_length", r"snapshot layout is invalid.*extra state is 8 bytes, the payload has 0"),
    ("extra_for_balloon", r"virtio-balloon: the snapshot has 8 bytes of extra state, the device keeps none"),
    ("unterminated_name", r"snapshot layout is invalid.*device record 0: device name is not NUL"),
    ("device_count", r"snapshot layout is invalid"),
    ("version_1", r"unsupported format version: version 1, this core reads version 4"),
])
def test_damaged_device_records_refused(native, balloon_snapshot, tmp_path, damage, why):
    d = _copy(balloon_snapshot, tmp_path)
    state_path = d / "state.bin"
    state = state_path.read_bytes()
    queue = RECORD_QUEUES_OFFSET
    patches = {
        "queue_size": (queue, struct.pack("<H", 512)),
        "queue_outside_ram": (queue + QUEUE_STATE_BYTES + 8, struct.pack("<Q", 1 << 40)),
        "blob_length": (RECORD_BLOB_LEN_OFFSET, struct.pack("<I", 10_000)),
        "blob_length_for_device": (RECORD_BLOB_LEN_OFFSET, struct.pack("<I", 8)),
        "extra_length": (RECORD_EXTRA_LEN_OFFSET, struct.pack("<I", 8)),
        "unterminated_name": (0, b"A" * 32),
    }
    if damage == "truncated_record":
        state_path.write_bytes(state[:-100])
    elif damage in patches:
        field_offset, data = patches[damage]
        _patch(state_path, device_record_offset(state, 0) + field_offset, data)
        reseal(state_path)
    elif damage == "extra_for_balloon":   # a consistent file whose balloon claims extra state
        payload = HEADER.unpack_from(state)[6]
        state_path.write_bytes(state + bytes(8))
        _patch(state_path, device_record_offset(state, 0) + RECORD_EXTRA_LEN_OFFSET, struct.pack("<I", 8))
        _patch(state_path, PAYLOAD_OFFSET, struct.pack("<Q", payload + 8))
        reseal(state_path)
    elif damage == "device_count":
        _patch(state_path, 48, struct.pack("<I", 2))
        reseal(state_path)
    elif damage == "version_1":
        _patch(state_path, VERSION_OFFSET, struct.pack("<I", 1))
    with pytest.raises(native.NativeCoreError, match=why):
        native.NativeVm.restore(d, **BALLOON_DEVICES)


def blk_pattern(seed: int, n: int) -> tuple[bytes, int]:
    """The blk probe's bytes (its LCG, top byte of each step) and the seed after them."""
    out = bytearray()
    for _ in range(n):
        seed = (seed * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out.append(seed >> 56)
    return bytes(out), seed


@pytest.fixture(scope="module")
def blk_snapshot(native, tmp_path_factory):
    """A blk probe snapshotted at its snapshot point, with a copy of its disk at that moment."""
    root = tmp_path_factory.mktemp("snap")
    disk = root / "disk.img"
    disk.write_bytes(bytes(DISK_BYTES))
    vm = native.NativeVm(native.probe_path("blk"), cmdline=f"seed={BLK_SEED} snap=1",
                         volumes=[(disk, False, DISK_SERIAL)], strict_unhandled_exits=True)
    try:
        out = run_to_snapshot_point(vm, "blk")
        vm.snapshot(root / "blk")
    finally:
        vm.close()
    assert "queue position 5\n" in out, out  # write, flush, read, get-id, read past the end
    return root / "blk", disk


def test_blk_restores_continue_on_their_own_disks(native, blk_snapshot, tmp_path):
    snap, disk = blk_snapshot
    first, seed = blk_pattern(BLK_SEED, 8 * SECTOR)
    second, _ = blk_pattern(seed, SECTOR)
    second_offset = 9 * SECTOR
    copies = [tmp_path / f"disk{i}.img" for i in range(2)]
    for copy in copies:
        shutil.copyfile(disk, copy)
    for i, copy in enumerate(copies):
        vm = native.NativeVm.restore(snap, volumes=[(copy, False, DISK_SERIAL)])
        try:
            out = continue_to_ok(vm, "blk")
            assert f"second round checksum {hex(fnv1a(second))}" in out, out
            assert "queue position 9\n" in out, out  # + write, flush, read, re-read
            device = vm.device("virtio-blk0")
            c = device["counters"]
            assert not device["broken"], device["broken_reason"]
            assert (c["write_requests"], c["flush_requests"], c["read_requests"]) == (1, 1, 2)
            assert c["malformed_requests"] == 0 and c["io_errors"] == 0
            # the restored queue's doorbell (a host-side KVM object) is armed anew: its four
            # notifies come without an exit
            assert c["queue_notifications"] == c["doorbell_notifications"] == 4, c
        finally:
            vm.close()
        data = copy.read_bytes()
        assert data[SECTOR:SECTOR + len(first)] == first
        assert data[second_offset:second_offset + SECTOR] == second
        for other in copies[i + 1:]:  # each restore wrote its own copy only
            assert other.read_bytes()[second_offset:second_offset + SECTOR] == bytes(SECTOR)
    assert disk.read_bytes()[second_offset:second_offset + SECTOR] == bytes(SECTOR)


@pytest.mark.parametrize("change, why", [
    ("size", r"snapshot restore: virtio-blk0: backing file is 1048064 bytes, the snapshot's disk was 1048576"),
    ("read_only", r"snapshot restore: virtio-blk0: backing file is read-only, the snapshot's disk was read-write"),
    ("serial", r"snapshot restore: virtio-blk0: serial is other, the snapshot's disk was vol-snap"),
    ("missing", r"snapshot device list differs.*\[virtio-blk0\].*\[\]"),
])
def test_blk_restore_with_another_disk_refused(native, blk_snapshot, tmp_path, change, why):
    snap, disk = blk_snapshot
    copy = tmp_path / "disk.img"
    shutil.copyfile(disk, copy)
    volume = (copy, change == "read_only", "other" if change == "serial" else DISK_SERIAL)
    if change == "size":
        with open(copy, "r+b") as f:
            f.truncate(DISK_BYTES - SECTOR)
    volumes = [] if change == "missing" else [volume]
    with pytest.raises(native.NativeCoreError, match=why):
        native.NativeVm.restore(snap, volumes=volumes)


def test_vsock_restore_resets_the_transport(native, short_tmp):
    """A vsock VM snapshotted while its guest listens: the restore (own socket, other CID) has
    no connections and sends the guest a transport reset event; the guest drops its
    connections, re-reads its CID, keeps listening, and the probe then runs to its end on the
    restored queues."""
    snap = short_tmp / "s"
    vm = native.NativeVm(native.probe_path("vsock"), vsock_uds_path=short_tmp / "a.sock",
                         vsock_guest_cid=3, strict_unhandled_exits=True)
    try:
        vm.start()
        vm.wait_for_console(b"listening on 1234\n", PROBE_TIMEOUT_S)
        vm.snapshot(snap)
    finally:
        vm.close()
    uds = str(short_tmp / "b.sock")
    acceptor, received = accept_one_connection(uds + "_5000", PROBE_TIMEOUT_S)
    restored = native.NativeVm.restore(snap, vsock_uds_path=uds, vsock_guest_cid=5)
    try:
        assert restored.vsock_uds_path == uds
        c = restored.device("virtio-vsock")["counters"]
        assert c["transport_resets"] == 1 and c["active_connections"] == 0
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(PROBE_TIMEOUT_S)
        s.connect(uds)
        s.sendall(b"CONNECT 1234\n")
        reader = s.makefile("rb")
        try:
            answer = reader.readline()
        except TimeoutError:
            pytest.fail(f"no answer to CONNECT; guest console: {restored.console_output()!r}")
        assert answer.startswith(b"OK "), restored.console_output()
        s.sendall(b"after the restore\n")
        assert reader.readline() == b"AFTER THE RESTORE\n"
        reader.close()
        s.close()
        acceptor.join(PROBE_TIMEOUT_S)
        # the guest's own connection carries its new CID, or the device would drop it
        assert received.get("data") == b"hello from the vsock probe\n"
        assert restored.wait(PROBE_TIMEOUT_S) == "stopped"
        out = restored.console_output().decode()
        assert "PROBE vsock OK" in out, out
        assert "transport reset" in out and "cid 5" in out, out
        c = restored.device("virtio-vsock")["counters"]
        assert c["transport_resets"] == 1 and c["events_sent"] == 1
        assert c["packets_dropped"] == 0 and not restored.device("virtio-vsock")["broken"]
    finally:
        restored.close()


# -- virtio-fs: the FUSE session across a snapshot ---------------------------------------------
# The fs probe with snap=1 holds node ids (hello.txt, sub, sub/deep.txt, gone.txt,
# inside_link) and handles (hello.txt read, sub/deep.txt append, gone.txt read, the directory
# sub) at its snapshot point, then uses each again and prints "after <what> -> <rc>".
FS_HELLO = "hello from the host side\n"      # the probe checks this text
FS_DEEP = "deep in the share\n"
FS_APPENDED = "after the restore\n"
FS_SESSION_PATHS = {"hello.txt", "sub", "sub/deep.txt", "gone.txt", "inside_link"}
FS_STATE = struct.Struct("<40sIIII")        # sm_fs_state (virtio_fs.h): the record's blob
FS_ENTRY = struct.Struct("<IIIIQII")        # sm_fs_saved_entry: table, index, kind, flags, nlookup, path_len
FS_NODE, FS_HANDLE = 1, 2
FS_KINDS = {0: "gone", 1: "file", 2: "dir", 3: "symlink", 4: "other"}
ESTALE, EBADF, ENOENT = 116, 9, 2


def make_fs_share(root: Path) -> Path:
    share = root / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_text(FS_HELLO)
    (share / "sub" / "deep.txt").write_text(FS_DEEP)
    (share / "gone.txt").write_text("deleted before the restore\n")
    (share / "inside_link").symlink_to("hello.txt")
    outside = root / "outside"
    outside.mkdir()
    (outside / "deep.txt").write_text("host file outside the share\n")
    (outside / "secret").write_text("host secret\n")
    return share


def copy_share(template: Path, root: Path) -> Path:
    """A share as the snapshot saw it, in root (with the outside folder its symlinks test)."""
    shutil.copytree(template.parent, root, symlinks=True, dirs_exist_ok=True)
    return root / "share"


def fs_record(state: bytes) -> tuple[int, dict, list[tuple[dict, bytes]]]:
    """The virtio-fs0 record's offset, its blob and its extra state's entries."""
    rec = state.index(b"virtio-fs0\0")
    blob_len, extra_len = struct.unpack_from("<II", state, rec + RECORD_BLOB_LEN_OFFSET)
    assert blob_len == FS_STATE.size
    tag, read_only, initialized, minor, _ = FS_STATE.unpack_from(state, rec + RECORD_BLOB_OFFSET)
    blob = {"tag": tag.rstrip(b"\0").decode(), "read_only": read_only,
            "initialized": initialized, "minor": minor, "extra_len": extra_len}
    # the only device: its extra state is the end of state.bin
    extra = state[len(state) - extra_len:]
    assert rec + DEVICE_RECORD_BYTES == len(state) - extra_len
    entries, at = [], 0
    while at < len(extra):
        table, index, kind, flags, nlookup, path_len, _ = FS_ENTRY.unpack_from(extra, at)
        at += FS_ENTRY.size
        entries.append(({"table": table, "index": index, "kind": FS_KINDS[kind], "flags": flags,
                         "nlookup": nlookup, "at": len(state) - extra_len + at},
                        extra[at:at + path_len]))
        at += path_len
    return rec, blob, entries


@pytest.fixture(scope="module")
def fs_snapshot(native, tmp_path_factory):
    """An fs probe snapshotted at its snapshot point holding its session, and a pristine copy
    of its share as it was then (tests restore against copies of it)."""
    root = tmp_path_factory.mktemp("fs")
    share = make_fs_share(root / "original")
    vm = native.NativeVm(native.probe_path("fs"), cmdline="snap=1 ro=0",
                         mounts=[(share, "hostshare", False)], strict_unhandled_exits=True)
    try:
        out = run_to_snapshot_point(vm, "fs")
        vm.snapshot(root / "snap")
    finally:
        vm.close()
    assert "session nodes 2 3 4 5 6 handles 1 2 3 4" in out, out
    template = copy_share(share, root / "template")
    return root / "snap", template


def fs_restore(native, snap: Path, share: Path, read_only: bool = False, tag: str = "hostshare"):
    return native.NativeVm.restore(snap, mounts=[(share, tag, read_only)])


def test_fs_snapshot_keeps_the_session_as_paths(fs_snapshot):
    snap, _ = fs_snapshot
    state = (snap / "state.bin").read_bytes()
    _, blob, entries = fs_record(state)
    assert blob["tag"] == "hostshare" and blob["read_only"] == 0 and blob["initialized"] == 1
    assert blob["minor"] == 31                      # the probe asks 7.38, the core speaks 7.31
    nodes = {path.decode(): e for e, path in entries if e["table"] == FS_NODE}
    handles = {e["index"] + 1: (path.decode(), e) for e, path in entries if e["table"] == FS_HANDLE}
    assert set(nodes) == FS_SESSION_PATHS
    assert [nodes[p]["index"] + 1 for p in ("hello.txt", "sub", "sub/deep.txt", "gone.txt",
                                            "inside_link")] == [2, 3, 4, 5, 6]
    assert {p: nodes[p]["kind"] for p in nodes} == {
        "hello.txt": "file", "sub": "dir", "sub/deep.txt": "file", "gone.txt": "file",
        "inside_link": "symlink"}
    assert all(e["nlookup"] == 1 for e in nodes.values())
    assert {fh: (path, e["kind"], e["flags"]) for fh, (path, e) in handles.items()} == {
        1: ("hello.txt", "file", 0), 2: ("sub/deep.txt", "file", 0o2001),   # O_WRONLY|O_APPEND
        3: ("gone.txt", "file", 0), 4: ("sub", "dir", 0)}


def _after(out: str, what: str) -> int:
    m = re.search(rf"^after {re.escape(what)} -> (-?\d+)$", out, re.MULTILINE)
    assert m, (what, out)
    return int(m.group(1))


def test_fs_session_continues_after_restore(native, fs_snapshot, tmp_path):
    """Two restores, each on its own copy of the share: the guest reads through its old handle,
    looks up through its old directory node (and gets the same node id back), appends through
    its old write handle (the host sees it), lists through its old directory handle. On the
    first copy gone.txt was deleted before the restore: its node and handle answer ESTALE,
    RELEASE and FORGET still free them; on the second, gone.txt is still there and works."""
    snap, template = fs_snapshot
    shares = [copy_share(template, tmp_path / f"r{i}") for i in range(2)]
    (shares[0] / "gone.txt").unlink()
    for i, share in enumerate(shares):
        vm = fs_restore(native, snap, share)
        try:
            out = continue_to_ok(vm, "fs")
            counters = vm.device("virtio-fs0")["counters"]
        finally:
            vm.close()
        assert "session nodes" not in out and "init 7." not in out   # carried on, no new INIT
        assert _after(out, "read hello.txt handle") == 0 and "after hello.txt content ok" in out
        assert _after(out, "getattr hello.txt") == 0
        assert _after(out, "lookup sub/deep.txt") == 0
        assert "after lookup sub/deep.txt answers the same node id" in out
        assert _after(out, "append sub/deep.txt") == 0
        assert (share / "sub" / "deep.txt").read_text() == FS_DEEP + FS_APPENDED
        assert _after(out, "readdir sub") == 0 and "after readdir sub lists deep.txt" in out
        assert _after(out, "readlink inside_link") == 0 and "after inside_link = hello.txt" in out
        assert "after lookup hello.txt answers the same node id" in out
        for what in ("release hello.txt handle", "release sub/deep.txt handle", "releasedir sub",
                     "release gone.txt handle"):
            assert _after(out, what) == 0, what
        assert _after(out, "read released gone.txt handle") == -EBADF
        assert _after(out, "getattr forgotten gone.txt") == -ENOENT
        deleted = i == 0
        assert _after(out, "getattr gone.txt") == (-ESTALE if deleted else 0)
        assert _after(out, "read gone.txt handle") == (-ESTALE if deleted else 0)
        assert counters["gone_at_restore"] == (2 if deleted else 0)   # gone.txt's node and handle
        assert counters["stale_answers"] == (2 if deleted else 0)
        assert counters["escape_refusals"] == 0
    # each restore wrote into its own share only; the template and the outside are untouched
    assert (template / "sub" / "deep.txt").read_text() == FS_DEEP
    assert (template.parent / "outside" / "deep.txt").read_text() == "host file outside the share\n"


def test_fs_restore_never_follows_a_symlink_put_in_the_way(native, fs_snapshot, tmp_path):
    """Between snapshot and restore the host replaces the directory sub with a symlink to a
    folder outside the share holding a deep.txt, and hello.txt with a symlink to a secret
    outside: the saved paths are walked one entry at a time without following symlinks, so
    those nodes and handles come back gone (ESTALE) and nothing outside is read or written."""
    snap, template = fs_snapshot
    share = copy_share(template, tmp_path)
    outside = tmp_path / "outside"
    shutil.rmtree(share / "sub")
    (share / "sub").symlink_to(outside)
    (share / "hello.txt").unlink()
    (share / "hello.txt").symlink_to(outside / "secret")
    before = {p.name: p.read_text() for p in outside.iterdir()}
    vm = fs_restore(native, snap, share)
    try:
        out = continue_to_ok(vm, "fs")
        counters = vm.device("virtio-fs0")["counters"]
    finally:
        vm.close()
    for what in ("read hello.txt handle", "getattr hello.txt", "lookup sub/deep.txt",
                 "append sub/deep.txt", "readdir sub"):
        assert _after(out, what) == -ESTALE, what
    assert "content" not in out                       # no byte of the secret reached the guest
    assert _after(out, "getattr gone.txt") == 0 and _after(out, "read gone.txt handle") == 0
    assert _after(out, "lookup hello.txt") == 0       # a fresh lookup: the symlink, a new node
    assert "after lookup hello.txt answers the same node id" not in out
    # hello.txt, sub, sub/deep.txt nodes; hello.txt, sub/deep.txt, sub handles
    assert counters["gone_at_restore"] == 6
    assert {p.name: p.read_text() for p in outside.iterdir()} == before


def _tamper(state_path: Path, path: bytes, replacement: bytes | None = None,
            path_len: int | None = None) -> None:
    """Rewrite the first saved entry whose path is `path` (its bytes or its length)."""
    state = state_path.read_bytes()
    _, _, entries = fs_record(state)
    entry = next(e for e, p in entries if p == path)
    if replacement is not None:
        assert len(replacement) == len(path)
        _patch(state_path, entry["at"], replacement)
    if path_len is not None:
        _patch(state_path, entry["at"] - FS_ENTRY.size + 24, struct.pack("<I", path_len))
    reseal(state_path)


@pytest.mark.parametrize("path, replacement, why", [
    (b"sub/deep.txt", b"../../secret", "not relative single entries"),
    (b"sub/deep.txt", b"sub/../../.x", "not relative single entries"),
    (b"sub/deep.txt", b"/tmp/outside", "not relative single entries"),
    (b"sub/deep.txt", b"sub//eep.txt", "not relative single entries"),
    (b"sub/deep.txt", b"sub/dee\0.txt", "not relative single entries"),
    (b"hello.txt", b"./llo.txt", "not relative single entries"),
    (b"gone.txt", None, "has a path of 100000 bytes"),
])
def test_fs_tampered_session_refused(native, fs_snapshot, tmp_path, path, replacement, why):
    """A snapshot is input: a saved path with '..', '.', a leading '/', an empty entry, a NUL
    or a length beyond the session (checksum resealed, so the fs device's own checks are what
    refuses it) fails the restore with the reason; nothing outside the share is touched."""
    snap, template = fs_snapshot
    d = _copy(snap, tmp_path)
    share = copy_share(template, tmp_path / "r")
    if replacement is None:
        _tamper(d / "state.bin", path, path_len=100_000)
    else:
        _tamper(d / "state.bin", path, replacement)
    with pytest.raises(native.NativeCoreError,
                       match=rf"snapshot restore: virtio-fs0: the snapshot's FUSE session entry "
                             rf"\d+ .*{re.escape(why)}"):
        fs_restore(native, d, share)
    assert (share.parent / "outside" / "deep.txt").read_text() == "host file outside the share\n"


@pytest.mark.parametrize("change, why", [
    ("read_only", r"snapshot restore: virtio-fs0: the share is read-only, the snapshot's was read-write"),
    ("tag", r"snapshot restore: virtio-fs0: the share's tag is other, the snapshot's was hostshare"),
    ("missing_mount", r"snapshot device list differs.*\[virtio-fs0\].*\[\]"),
    ("missing_folder", r"virtio-fs0: cannot open directory .*no-such-folder"),
])
def test_fs_restore_with_another_share_refused(native, fs_snapshot, tmp_path, change, why):
    snap, template = fs_snapshot
    share = copy_share(template, tmp_path)
    with pytest.raises(native.NativeCoreError, match=why):
        if change == "missing_mount":
            native.NativeVm.restore(snap)
        else:
            fs_restore(native, snap, tmp_path / "no-such-folder" if change == "missing_folder" else share,
                       read_only=change == "read_only", tag="other" if change == "tag" else "hostshare")


def test_fs_session_too_large_refuses_the_snapshot(native, tmp_path):
    """1000 node ids of ~1.2 KiB paths are more than the 1 MiB of session a snapshot keeps per
    share: the snapshot is refused with the reason and what to do, nothing is written, and
    the guest runs on."""
    share = tmp_path / "share"
    deep = share.joinpath(*["d" * 200] * 5)
    deep.mkdir(parents=True)
    for i in range(1000):
        (deep / (f"f{i:04d}" + "x" * 145)).touch()
    vm = native.NativeVm(native.probe_path("fs"), cmdline="snap=1 many=1000",
                         mounts=[(share, "hostshare", False)], strict_unhandled_exits=True)
    try:
        run_to_snapshot_point(vm, "fs")
        assert "held 1000 deep names" in vm.console_output().decode()
        with pytest.raises(native.NativeCoreError,
                           match=r"snapshot: virtio-fs0: the guest's FUSE session .* is larger "
                                 r"than the 1048576 bytes a snapshot keeps per share: .*drop_caches"):
            vm.snapshot(tmp_path / "s")
        assert vm.state == "running"
        assert not (tmp_path / "s" / "state.bin").exists()
        assert not (tmp_path / "s" / "memory.bin").exists()
        continue_to_ok(vm, "fs")
    finally:
        vm.close()
