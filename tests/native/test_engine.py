"""The native engine (engines/native.py) over a real guest image.

On this workplace's emulated KVM the guest kernel cannot get past early boot, so the agent
is never reached: the test checks what a user sees then — the console streams into the
VM's ConsoleBuffer, ``connect_agent`` fails with an EngineError naming the emulation
failure (not a hang), ``exit_description`` names it, shutdown is clean. Where KVM runs at
hardware speed the full Vm-level tests (exec, balloon) apply to engine="native" instead.
"""

from __future__ import annotations

import time

import pytest

from .conftest import find_guest_kernel


def _spec(tmp_path, native_memory_mib=128, balloon=True):
    from supermachine_jupyter.config import VmConfig
    from supermachine_jupyter.guest.console import ConsoleBuffer
    from supermachine_jupyter.engines.base import LaunchSpec
    vmlinux = find_guest_kernel("vmlinux")
    initrds = sorted(vmlinux.parent.parent.glob("initramfs-*.cpio.gz"))
    if not initrds:
        pytest.fail(f"no initramfs next to {vmlinux.parent}: build the guest assets first")
    return LaunchSpec(name="nat-test", memory_mib=native_memory_mib, vcpus=1,
                      kernel=vmlinux.parent / "bzImage", vmlinux=vmlinux, initrd=initrds[-1],
                      cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
                      config=VmConfig(balloon=balloon, vsock_mux_dir=str(tmp_path)),
                      run_dir=tmp_path, console=ConsoleBuffer())


def test_native_engine_surfaces_early_boot_failure(native, kvm_speed, short_tmp):
    from supermachine_jupyter.errors import EngineError
    spec = _spec(short_tmp)
    inst = native.ENGINE.boot(spec, "kvm", "test")
    try:
        assert inst.engine_name == "native" and inst.process_ids() == []
        assert inst.vsock_path.parent == short_tmp
        if kvm_speed == "hardware":
            sock = inst.connect_agent(timeout=120)
            sock.close()
            print("case: hardware-speed KVM -> the agent answered over the vsock mux")
            return
        print("case: emulated KVM -> the guest cannot reach its agent; the error must say why")
        t0 = time.monotonic()
        with pytest.raises(EngineError) as e:
            inst.connect_agent(timeout=240)
        assert time.monotonic() - t0 < 240
        assert "emulation_failure" in str(e.value) and "RIP 0x" in str(e.value), str(e.value)
        assert not inst.is_running()
        assert inst.exit_description().startswith("emulation_failure: KVM emulation failure")
        deadline = time.monotonic() + 5
        while "VM failed" not in spec.console.text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = spec.console.text()
        assert "Linux version" in text and "sm.agent=vsock:1024" in text
        assert "[supermachine] VM failed (emulation_failure)" in text
        stats = inst.balloon_stats(0)
        assert stats.target_pages == 0 and stats.free_memory is None
    finally:
        inst.shutdown(None, timeout=5)
    assert not inst.is_running()
    assert not inst.vsock_path.exists()


def test_native_engine_attaches_mounts_as_virtio_fs(native, short_tmp):
    # The device itself is exercised by the fs probe (test_virtio_fs.py); here: a MountSpec
    # reaches the core as a virtio-fs device with its tag, and the VM still stops cleanly.
    from supermachine_jupyter.config import MountSpec, VmConfig
    spec = _spec(short_tmp)
    import dataclasses
    cfg = VmConfig(mounts=[MountSpec(str(short_tmp), "data", "/mnt/data", read_only=True)],
                   vsock_mux_dir=str(short_tmp))
    inst = native.ENGINE.boot(dataclasses.replace(spec, config=cfg), "kvm", "test")
    try:
        assert any(d["name"] == "virtio-fs0" for d in inst.vm.devices())
        (status,) = inst.mount_status()
        assert status.spec.tag == "data" and status.spec.read_only and not status.dax
        assert "DAX" in status.dax_note
    finally:
        inst.shutdown(None, timeout=5)
    assert not inst.is_running()


def test_a_config_beyond_the_cores_limits_is_refused_before_anything_starts(native, tmp_path):
    from supermachine_jupyter.config import VmConfig
    from supermachine_jupyter.errors import EngineError
    from supermachine_jupyter.image import Image
    probe = native.probe_path("agent")
    config = VmConfig(engine="native", memory_mib=64)
    for i in range(9):
        config = config.with_volume(str(tmp_path / f"v{i}.img"), f"/data{i}", size_mib=8)
    with pytest.raises(EngineError, match=r"engine='native' cannot run this VM: takes at most "
                                          r"8 volumes \(virtio-blk devices\), this config has 9"):
        Image(probe, probe, probe).start(config)
    assert not list(tmp_path.glob("v*.img")), "volumes were formatted for a VM that never ran"
