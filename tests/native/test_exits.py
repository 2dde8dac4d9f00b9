"""Every KVM exit the core does not handle ends (or flags) the VM with a named error that
surfaces in Python as an exception on the next call and on the console."""

from __future__ import annotations

import pytest

TIMEOUT_S = 30


def _exits_vm(native, mode, strict=True):
    vm = native.NativeVm(native.probe_path("exits"), cmdline=f"mode={mode}",
                         strict_unhandled_exits=strict)
    vm.start()
    vm.wait(TIMEOUT_S)
    return vm


@pytest.mark.parametrize("mode,reason,needle", [
    ("io", "unhandled_io", "unhandled I/O port write: port 0x1234, size 1, value 0x55"),
    ("mmio", "unhandled_mmio", "unhandled MMIO read: address 0xe0000000, size 4"),
])
def test_unhandled_access_ends_vm_in_strict_mode(native, mode, reason, needle):
    vm = _exits_vm(native, mode)
    try:
        info = vm.exit_info()
        assert info["state"] == "failed" and info["reason"] == reason, info
        assert needle in info["message"]
        assert "at RIP 0x" in info["message"] and info["rip"] >= 0x200000
        assert info["insn_bytes"], info                       # bytes of the faulting in/out/mov
        assert f"VM failed ({reason})" in vm.console_output().decode()
        with pytest.raises(native.GuestFaultError) as e:
            vm.console_write(b"x")
        assert e.value.reason == reason and needle in str(e.value)
    finally:
        vm.close()


def test_unhandled_access_is_flagged_in_lenient_mode(native):
    vm = _exits_vm(native, "io", strict=False)
    try:
        out = vm.console_output().decode()
        assert "PROBE exits FAIL the exit did not end the VM" in out   # guest went on
        info = vm.exit_info()
        assert info["state"] == "stopped" and info["unhandled_io_count"] == 1
        assert "port 0x1234" in info["first_unhandled"]
    finally:
        vm.close()


def test_triple_fault_or_emulation_failure(native):
    """int3 with an empty IDT: on hardware-speed KVM a triple fault (KVM_EXIT_SHUTDOWN); on an
    instruction-emulating KVM (this workplace's kvm_pvm) the emulator gives up first. Either
    way the VM ends with a named error, RIP and the int3 byte."""
    vm = _exits_vm(native, "triple")
    try:
        info = vm.exit_info()
        assert info["state"] == "failed", info
        assert info["reason"] in ("triple_fault", "emulation_failure"), info
        print(f"int3 with empty IDT ended the VM as {info['reason']}: {info['message']}")
        if info["reason"] == "emulation_failure":
            assert info["insn_bytes"][:1] == b"\xcc"
            assert "KVM_INTERNAL_ERROR_EMULATION" in info["message"]
        else:
            assert "KVM_EXIT_SHUTDOWN" in info["message"]
        with pytest.raises(native.GuestFaultError):
            vm.pause()
    finally:
        vm.close()


def test_xrstor_emulation_failure_carries_rip_and_bytes(native):
    vm = _exits_vm(native, "xrstor")
    try:
        info = vm.exit_info()
        out = vm.console_output().decode()
        if info["state"] == "stopped":
            # Hardware-speed KVM runs xrstor natively.
            assert "xrstor ok" in out
            print("xrstor ran natively: KVM runs guests at hardware speed here")
            return
        print(f"xrstor ended the VM: {info['message']}")
        assert info["reason"] == "emulation_failure", info
        assert info["kvm_exit_reason"] == 17                   # KVM_EXIT_INTERNAL_ERROR
        assert info["kvm_suberror"] == 1                       # KVM_INTERNAL_ERROR_EMULATION
        assert info["insn_bytes"][:2] == b"\x0f\xae"            # xrstor / xsetbv group
        assert f"RIP {hex(info['rip'])}" in info["message"]
        assert "instruction bytes [0f ae" in info["message"]
    finally:
        vm.close()
