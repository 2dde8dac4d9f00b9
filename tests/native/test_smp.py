"""vCPUs the guest can find and start: the MP table (native/src/mptable.c) and the APs.

The native core runs one thread per vCPU; without a table Linux sees one CPU whatever
``vcpus`` says. The ``smp`` probe reads the table the way Linux's mpparse does and starts
every listed AP with INIT-SIPI-SIPI; each AP reports its APIC id (native/guest/probes/smp.c).
The table's bytes are also parsed here from a snapshot's memory.bin, by this file's own
reader of the MP Specification 1.4 layout, so the probe and the core cannot agree on a
mistake. A snapshot taken with the APs up must carry every vCPU, and the restored APs must
start again; pause and stop must reach vCPUs halted or still waiting for their SIPI.
"""

from __future__ import annotations

import re
import struct
import time

import pytest

PROBE_TIMEOUT_S = 120
MP_TABLE_GPA = 0x9FC00
HEADER = struct.Struct("<8sIIQIIQQII")  # sm_snapshot_header (native/src/snapshot.h)


def _run_smp(native, vcpus: int, cmdline: str = ""):
    vm = native.NativeVm(str(native.probe_path("smp")), vcpus=vcpus, cmdline=cmdline,
                         strict_unhandled_exits=True)
    vm.start()
    return vm


def _fields(out: str, kind: str) -> list[dict[str, str]]:
    """The key=value fields of every ``MP <kind> ...`` line of the probe's output."""
    return [dict(re.findall(r"(\S+)=(\S+)", line[len(f"MP {kind} "):]))
            for line in out.splitlines() if line.startswith(f"MP {kind} ")]


def _check_report(out: str, vcpus: int, round_name: str = "boot") -> None:
    cpus = _fields(out, "cpu")
    assert [int(c["apic"]) for c in cpus] == list(range(vcpus)), out
    assert [c["bsp"] for c in cpus] == ["1"] + ["0"] * (vcpus - 1), out
    assert all(c["enabled"] == "1" for c in cpus), out
    (ioapic,) = _fields(out, "ioapic")
    assert ioapic == {"id": str(vcpus), "version": "17", "enabled": "1", "address": "0xfec00000"}
    # the IOAPIC as KVM has it: the same id (KVM keeps 4 bits of it) and version, 24 pins
    (regs,) = _fields(out, "ioapic-registers")
    assert regs == {"id": str(vcpus & 0xF), "version": "17", "pins": "24"}, out
    assert _fields(out, "io-interrupts") == [{"count": "24", "irq-to-same-pin": "24"}], out
    assert _fields(out, "lint") == [{"type": "3", "apic": "0", "lint": "0"},    # ExtINT → BSP
                                    {"type": "1", "apic": "255", "lint": "1"}], out  # NMI → all
    assert _fields(out, "this-cpu") == [{"lapic-id": "0"}], out
    (started,) = _fields(out, round_name)
    assert started == {"aps-expected": str(vcpus - 1), "aps-counted": str(vcpus - 1)}, out


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_guest_finds_every_vcpu_in_the_mp_table_and_starts_the_aps(native, vcpus):
    vm = _run_smp(native, vcpus)
    try:
        vm.wait(PROBE_TIMEOUT_S)
        out = vm.console_output().decode(errors="replace")
        assert "PROBE smp OK" in out, out
        _check_report(out, vcpus)
        # every AP ran the start code itself: its own CPUID APIC id, once each
        assert [int(a["apic"]) for a in _fields(out, "ap-up")] == list(range(1, vcpus)), out
        assert vm.exit_info()["reason"] == "guest_reset"
    finally:
        vm.close()


def _parse_mp_table(memory: bytes) -> dict:
    """The MP floating pointer at MP_TABLE_GPA and its configuration table, checked."""
    mpf = memory[MP_TABLE_GPA:MP_TABLE_GPA + 16]
    assert mpf[:4] == b"_MP_" and mpf[8] == 1 and mpf[9] == 4, mpf
    assert sum(mpf) % 256 == 0, "floating pointer checksum"
    assert mpf[11] == 0, "a configuration table follows, no default configuration"
    (table,) = struct.unpack_from("<I", mpf, 4)
    assert table == MP_TABLE_GPA + 16
    sig, length, spec, _checksum, oem, product, _oem_ptr, _oem_size, count, lapic = \
        struct.unpack_from("<4sHBB8s12sIHHI", memory, table)
    assert sig == b"PCMP" and spec == 4 and lapic == 0xFEE00000, (sig, spec, lapic)
    assert table + length <= 0xA0000, "the table stays below the VGA hole"
    assert sum(memory[table:table + length]) % 256 == 0, "configuration table checksum"
    entries, at = [], table + 44
    for _ in range(count):
        kind = memory[at]
        size = 20 if kind == 0 else 8
        assert kind <= 4 and at + size <= table + length, (kind, at)
        entries.append(memory[at:at + size])
        at += size
    assert at == table + length, "the entries fill the table exactly"
    return {"oem": oem, "product": product, "entries": entries}


def test_mp_table_bytes_and_a_restore_of_every_vcpu(native, tmp_path):
    vcpus = 3
    vm = _run_smp(native, vcpus, "snap=1")
    try:
        vm.wait_for_console(b"PROBE smp SNAPSHOT-POINT\n", PROBE_TIMEOUT_S)
        _check_report(vm.console_output().decode(errors="replace"), vcpus)
        vm.snapshot(tmp_path / "smp")
    finally:
        vm.close()

    state = (tmp_path / "smp" / "state.bin").read_bytes()
    assert HEADER.unpack_from(state)[4] == vcpus, "state.bin holds every vCPU"
    table = _parse_mp_table((tmp_path / "smp" / "memory.bin").read_bytes())
    cpus = [e for e in table["entries"] if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(0, 3), (1, 1), (2, 1)]  # APIC id, enabled|BSP
    assert [e for e in table["entries"] if e[0] == 1] == [b"\x01\x00ISA   "]
    assert [e for e in table["entries"] if e[0] == 2] == [bytes([2, vcpus, 0x11, 1]) +
                                                          struct.pack("<I", 0xFEC00000)]
    irqs = [e for e in table["entries"] if e[0] == 3]
    # INT, conforming (edge, active high), ISA bus IRQ i → IOAPIC pin i, for all 24 pins
    assert irqs == [bytes([3, 0, 0, 0, 0, i, vcpus, i]) for i in range(24)]

    restored = native.NativeVm.restore(tmp_path / "smp")
    try:
        restored.console_write(b"x")
        restored.wait(PROBE_TIMEOUT_S)
        out = restored.console_output().decode(errors="replace")
        assert "PROBE smp OK" in out, out
        (again,) = _fields(out, "again")
        assert again == {"aps-expected": "2", "aps-counted": "2"}, out
        assert "MP boot" not in out, "the restored guest started over"
    finally:
        restored.close()


def test_pause_and_stop_reach_aps_halted_and_aps_waiting_for_sipi(native):
    # APs that ran and halted (smp at its snapshot point) ...
    halted = _run_smp(native, 3, "snap=1")
    # ... and APs never started: the calib probe uses the boot CPU only
    waiting = native.NativeVm(str(native.probe_path("calib")), vcpus=3,
                              cmdline="iterations=100000000", strict_unhandled_exits=True)
    try:
        halted.wait_for_console(b"PROBE smp SNAPSHOT-POINT\n", PROBE_TIMEOUT_S)
        waiting.start()
        waiting.wait_for_console(b"CALIB start\n", PROBE_TIMEOUT_S)
        for vm in (halted, waiting):
            t0 = time.monotonic()
            vm.pause()
            assert vm.state == "paused"
            vm.resume()
            assert vm.state == "running"
            vm.stop()
            assert vm.state == "stopped" and vm.exit_info()["reason"] == "host_stop"
            assert time.monotonic() - t0 < 10
    finally:
        halted.close()
        waiting.close()
