"""Balloon, volumes and host mounts on real VMs under QEMU."""

import os
import signal

import pytest

from supermachine_jupyter import Image, VmConfig
from supermachine_jupyter.devices.balloon import BalloonNotEnabled
from tests.helpers import wait_for

QEMU = VmConfig(engine="qemu")


@pytest.fixture(scope="module")
def image():
    return Image.default()


# -- balloon -----------------------------------------------------------------------------

def test_balloon_inflate_moves_pages_and_lowers_rss_then_deflates(image):
    with image.start(QEMU.with_memory_mib(256).with_balloon()) as vm:
        # Touch guest memory so the host has really backed it before the balloon takes it.
        vm.run("dd if=/dev/zero of=/dev/shm/fill bs=1M count=120 2>/dev/null; rm /dev/shm/fill")
        before = vm.balloon_stats()
        rss_before = vm.instance.host_rss_bytes()
        assert before.actual_pages == 0 and before.target_pages == 0
        assert vm.request_balloon_inflate(64) == 64
        inflated = wait_for(lambda: (s := vm.balloon_stats()).actual_pages >= 16384 and s, 10)
        assert inflated, f"balloon did not reach 16384 pages: {vm.balloon_stats()}"
        assert inflated.target_mib == 64 and inflated.actual_mib >= 64
        rss_after = wait_for(lambda: (r := vm.instance.host_rss_bytes()) < rss_before - 32 * 2**20 and r, 10)
        # Margin: at least half of the 64 MiB must leave QEMU's RSS (page tables, caches
        # and QEMU's own allocations move too).
        assert rss_after, f"RSS {rss_before >> 20} MiB → {vm.instance.host_rss_bytes() >> 20} MiB"
        stats = wait_for(lambda: (s := vm.balloon_stats()).total_memory and s, 5)
        assert stats.total_memory and stats.free_memory is not None
        assert stats.hugetlb_failures is None or stats.hugetlb_failures >= 0
        vm.request_balloon_deflate(64)
        assert wait_for(lambda: vm.balloon_stats().actual_pages == 0, 10)


def test_balloon_without_device_says_how_to_enable(image):
    with image.start(QEMU) as vm:
        with pytest.raises(BalloonNotEnabled, match="balloon=True"):
            vm.request_balloon_inflate(16)


# -- volumes -----------------------------------------------------------------------------

def test_volume_data_survives_stop_and_engine_sigkill(image, tmp_path):
    disk = tmp_path / "data.img"
    config = QEMU.with_volume(str(disk), "/data", size_mib=64)
    with image.start(config) as vm:
        assert vm.run("echo one > /data/a && sync").ok
    assert disk.stat().st_blocks * 512 < 64 * 2**20      # sparse on the host
    vm = image.start(config)
    assert vm.run("cat /data/a").stdout == "one\n"
    assert vm.run("echo two > /data/b && sync").ok
    os.kill(vm.instance.process_ids()[0], signal.SIGKILL)
    vm.wait_stopped(10)
    vm.stop()
    with image.start(config) as vm:
        assert vm.run("cat /data/a /data/b").stdout == "one\ntwo\n"


def test_two_volumes_land_on_their_paths_and_read_only_refuses_writes(image, tmp_path):
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    with image.start(QEMU.with_volume(str(first), "/one", 32)
                     .with_volume(str(second), "/two", 32)) as vm:
        assert vm.run("echo 1 > /one/id; echo 2 > /two/id; sync").ok
    ro = QEMU.with_volume(str(first), "/one", 32).with_volume(str(second), "/two", 32,
                                                               read_only=True)
    with image.start(ro) as vm:
        assert vm.run("cat /one/id /two/id").stdout == "1\n2\n"
        result = vm.run("echo x > /two/new")
        assert result.exit_code != 0 and "Read-only" in result.stderr
        # The device itself is read-only, not only the mount:
        assert vm.run("cat /sys/block/$(basename $(grep ' /two ' /proc/mounts | cut -d' ' -f1))/ro").stdout == "1\n"


# -- host mounts -------------------------------------------------------------------------

@pytest.fixture
def shared(tmp_path):
    host = tmp_path / "shared"
    host.mkdir()
    (host / "hello.txt").write_text("from the host\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    os.symlink(str(tmp_path / "secret.txt"), host / "escape-abs")
    os.symlink("../secret.txt", host / "escape-rel")
    return host


def test_mount_reads_writes_and_confines(image, shared):
    with image.start(QEMU.with_virtiofs(str(shared), "share", "/mnt/share")) as vm:
        assert vm.run("cat /mnt/share/hello.txt").stdout == "from the host\n"
        before = vm.mounts()[0].counters
        assert vm.run("echo from the guest > /mnt/share/out.txt && sync").ok
        assert (shared / "out.txt").read_text() == "from the guest\n"
        for escape in ("/mnt/share/../secret.txt", "/mnt/share/escape-abs",
                       "/mnt/share/escape-rel"):
            assert "outside" not in vm.run(f"cat {escape}").stdout
        after = vm.mounts()[0].counters
        assert after.ops > before.ops and after.bytes_written > before.bytes_written
        status = vm.mounts()[0]
        assert status.spec.tag == "share" and not status.dax and "DAX" in status.dax_note


def test_read_only_mount_refuses_writes_host_side(image, shared):
    with image.start(QEMU.with_virtiofs(str(shared), "ro", "/mnt/ro", read_only=True)) as vm:
        assert vm.run("cat /mnt/ro/hello.txt").stdout == "from the host\n"
        # The guest mounted it read-only too (init passes "ro"), not only the host refusing.
        options = {line.split()[1]: line.split()[3].split(",")
                   for line in vm.run("cat /proc/mounts").stdout.splitlines()}
        assert "ro" in options["/mnt/ro"], options
        # Remount read-write inside the guest: the host still refuses.
        vm.run("mount -o remount,rw /mnt/ro")
        result = vm.run("echo x > /mnt/ro/new.txt")
        assert result.exit_code != 0
    assert not (shared / "new.txt").exists()


# -- balloon statistics: units and plausibility -------------------------------------------

MIB = 2**20


def _with_guest_stats(vm, timeout=15):
    """The first reading that carries the guest's own statistics (QEMU starts polling them
    on the first read, and the guest reports about once a second)."""
    return wait_for(lambda: (s := vm.balloon_stats()).total_memory is not None
                    and s.available_memory is not None and s, timeout)


def test_balloon_statistics_are_in_bytes_and_pages_and_follow_the_balloon(image):
    """Units as documented in balloon.py (Firecracker's): the guest's memory figures in
    bytes, the balloon in 4 KiB pages and MiB, fault counts as counts."""
    memory_mib, balloon_mib = 256, 64
    with image.start(QEMU.with_memory_mib(memory_mib).with_balloon()) as vm:
        before = _with_guest_stats(vm)
        assert before, f"no guest statistics: {vm.balloon_stats()}"
        total = before.total_memory
        # The guest's RAM less what its kernel keeps for itself, in bytes.
        assert memory_mib * MIB // 2 <= total <= memory_mib * MIB, before
        assert 0 < before.free_memory <= total, before
        # (MemAvailable may be below MemFree: it leaves out the kernel's reserves.)
        assert 0 < before.available_memory <= total, before
        assert before.disk_caches is None or 0 <= before.disk_caches <= total, before
        # Counts of faults, not bytes (the guest may report 0 early on, a reading it took
        # before its first fault accounting).
        assert 0 <= before.minor_faults < total, before
        assert (before.target_pages, before.actual_pages,
                before.target_mib, before.actual_mib) == (0, 0, 0, 0), before

        vm.set_balloon_target(balloon_mib)
        inflated = wait_for(lambda: (s := vm.balloon_stats()).actual_pages >= 16384 and s, 15)
        assert inflated, f"the balloon did not reach {balloon_mib} MiB: {vm.balloon_stats()}"
        assert (inflated.target_mib, inflated.actual_mib) == (balloon_mib, balloon_mib), inflated
        assert inflated.target_pages == inflated.actual_pages == balloon_mib * MIB // 4096

        # The guest's own figures follow: its available memory drops by about the balloon.
        drop = lambda s: before.available_memory - s.available_memory  # noqa: E731
        after = wait_for(lambda: (s := vm.balloon_stats()).available_memory is not None
                         and drop(s) >= balloon_mib * MIB * 3 // 4 and s, 10)
        assert after, (f"available memory {before.available_memory >> 20} MiB → "
                       f"{vm.balloon_stats().available_memory >> 20} MiB with a "
                       f"{balloon_mib} MiB balloon")
        assert drop(after) <= balloon_mib * MIB * 3 // 2, (before, after)
        # (MemTotal itself may grow a little after boot, as the kernel frees its init memory.)
        assert after.free_memory <= after.total_memory <= memory_mib * MIB, after
        assert after.available_memory <= after.total_memory, after

        vm.set_balloon_target(0)
        deflated = wait_for(lambda: (s := vm.balloon_stats()).actual_pages == 0
                            and drop(s) < balloon_mib * MIB // 4 and s, 15)
        assert deflated, f"after deflating: {vm.balloon_stats()} (before: {before})"
