"""The project's guest kernel under the native core.

Where KVM runs guests at hardware speed the kernel boots to the guest's init. On this
workplace's emulated KVM (kvm_pvm, no vmx/svm) the kernel gets through early boot — banner,
our exact command line, our e820 map — and then hits an instruction KVM cannot emulate
(``xrstor``, or ``int3`` with ``noxsave``): the core must end the VM with a clear error
carrying the exit reason, RIP and instruction bytes, not hang and not pause silently.
"""

from __future__ import annotations

import re
import time

from supermachine_jupyter import Image

from .conftest import find_guest_kernel

BOOT_MEMORY_MIB = 128
EARLY_BOOT_TIMEOUT_S = 240
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 sm_early_boot=1"
KERNEL_TEXT_START = 0xffffffff80000000


def _expected_e820_lines(memory_mib: int) -> list[str]:
    end = memory_mib * 1024 * 1024 - 1
    return ["BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            f"BIOS-e820: [mem 0x0000000000100000-{end:#018x}] usable"]


def test_pvh_vmlinux_early_boot(native, kvm_speed):
    kernel = find_guest_kernel("vmlinux")
    # Where the kernel can get that far, it gets the guest's initramfs, so it has an /init to run.
    initrd = Image.default().initrd if kvm_speed == "hardware" else None
    vm = native.NativeVm(kernel, initrd=initrd, memory_mib=BOOT_MEMORY_MIB, cmdline=CMDLINE,
                         balloon=True)
    try:
        t0 = time.monotonic()
        vm.start()
        if kvm_speed == "hardware":
            # Boots on: the console reaches the scheduler and the kernel keeps running.
            out = vm.wait_for_console(b"Run /init", EARLY_BOOT_TIMEOUT_S).decode(errors="replace")
            print("case: KVM at hardware speed -> the kernel boots to its init")
            assert "Run /init" in out, out[-2000:]
            assert vm.state == "running", vm.exit_info()
        else:
            state = vm.wait(EARLY_BOOT_TIMEOUT_S)
            elapsed = time.monotonic() - t0
            out = vm.console_output().decode(errors="replace")
            info = vm.exit_info()
            print(f"case: emulated KVM -> early boot then {info['reason']} after {elapsed:.1f} s:"
                  f" {info['message']}")
            assert state == "failed", f"no end after {EARLY_BOOT_TIMEOUT_S} s: {out[-2000:]}"
            assert info["reason"] == "emulation_failure", info
            assert info["kvm_exit_reason"] == 17 and info["kvm_suberror"] == 1
            assert info["rip"] >= KERNEL_TEXT_START, hex(info["rip"])
            assert re.search(r"at RIP 0xffffffff[0-9a-f]{8}, instruction bytes \[[0-9a-f ]+\]",
                             info["message"]), info["message"]
            # xrstor (0f ae /5, with REX.W 48) or the alternatives self-test's int3 (cc)
            insn = info["insn_bytes"]
            assert insn[:3] == b"\x48\x0f\xae" or insn[:2] == b"\x0f\xae" or insn[:1] == b"\xcc", insn.hex()
            assert "[supermachine] VM failed (emulation_failure)" in out
        assert "Linux version 6.1" in out
        assert f"Command line: {vm.cmdline}" in out          # our exact command line
        assert vm.cmdline.startswith(CMDLINE + " virtio_mmio.device=4K@0xd0000000:5")
        for line in _expected_e820_lines(BOOT_MEMORY_MIB):   # the e820 map we set
            assert line in out, out[:3000]
    finally:
        vm.close()


def test_bzimage_boot_protocol_entry(native, kvm_speed):
    """bzImage through the Linux boot protocol's 64-bit entry. Its decompressor (XZ here)
    runs ~10^4 times slower on the emulated KVM than natively, far beyond a test budget, so
    on emulated KVM this checks the handover (long mode, RIP inside the decompressor, moving
    forward, no fault); at hardware speed it checks the banner and command line."""
    kernel = find_guest_kernel("bzImage")
    vm = native.NativeVm(kernel, memory_mib=BOOT_MEMORY_MIB, cmdline=CMDLINE)
    try:
        vm.start()
        if kvm_speed == "hardware":
            out = vm.wait_for_console(f"Command line: {vm.cmdline}\n".encode(), 120).decode(errors="replace")
            print("case: KVM at hardware speed -> bzImage decompresses and prints its banner")
            assert "Linux version" in out and f"Command line: {vm.cmdline}" in out
            return
        print("case: emulated KVM -> checking the decompressor runs (it cannot finish in time)")
        samples = []
        for _ in range(3):
            time.sleep(1.0)
            vm.pause()
            samples.append(vm.vcpu_regs(0))
            vm.resume()
        assert vm.state == "running", vm.exit_info()
        for regs in samples:
            assert regs["cs_long_mode"] == 1 and regs["efer"] & 0x500 == 0x500   # LME|LMA
            assert 0x100000 <= regs["rip"] < BOOT_MEMORY_MIB * 1024 * 1024, hex(regs["rip"])
        assert len({r["rip"] for r in samples}) > 1, "the decompressor is not making progress"
    finally:
        vm.close()
