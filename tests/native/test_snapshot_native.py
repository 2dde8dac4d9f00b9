"""Native-core snapshots: sm_vm_snapshot / sm_vm_restore through NativeVm.snapshot/restore.

The counter probe counts in guest RAM and prints "COUNT <n>" every `every=` iterations; with
fill=<pages> it also fills guest pages with a pattern and re-checks them while counting. A VM
restored from a snapshot must continue from the snapshot's count (never print the probe's
READY line again), two restores must run independently, guest RAM must be shared with the
snapshot file copy-on-write, and any damaged snapshot must be refused with "snapshot" in the
error.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import time
from pathlib import Path

import pytest

COUNT_RE = re.compile(rb"COUNT (\d+)\n")
EVERY = 2000
SNAPSHOT_AT = 20000          # K: the original has printed at least this count at snapshot time
FILL_PAGES = 2048            # 8 MiB of patterned guest RAM in the snapshot
MEMORY_MIB = 32
HEADER = struct.Struct("<8sIIQIIQQ")  # sm_snapshot_header (native/src/snapshot.h)
VERSION_OFFSET = 8


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
    for line in open("/proc/self/smaps"):
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
    magic, version, header_bytes, memory_bytes, n_vcpus, _flags, payload, _sum = HEADER.unpack_from(state)
    assert magic == b"SMNSNAP\0" and version == 1 and header_bytes == HEADER.size
    assert memory_bytes == MEMORY_MIB << 20 and n_vcpus == 2
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


def test_snapshot_refuses_virtio_devices(native, tmp_path):
    vm = native.NativeVm(str(native.probe_path("counter")), memory_mib=MEMORY_MIB, balloon=True,
                         cmdline=f"every={EVERY}")
    try:
        vm.start()
        vm.wait_for_console(b"COUNT", 60)
        with pytest.raises(native.NativeCoreError, match="snapshot.*virtio-balloon"):
            vm.snapshot(tmp_path / "s")
        assert vm.state == "running"
        assert not (tmp_path / "s").exists()
    finally:
        vm.close()


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
