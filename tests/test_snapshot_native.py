"""Snapshots on the native engine, through the public API (Vm.snapshot, Image.from_snapshot).

The native core cannot boot Linux on this workplace's emulated KVM, so the guest is the
``agent`` probe: a freestanding guest that speaks the agent protocol over the core's
virtio-vsock device. Everything on the host side is the real path a Linux guest takes:
Image.start on engine="native", the core's snapshot files, the snapshot header, the core's
restore with devices re-attached, the vsock transport reset, the agent's HELLO within
``restore_timeout``. The guest's ``count`` built-in keeps a counter in guest RAM, so its
answers show whose memory a VM runs on.
"""

from __future__ import annotations

import shutil
import struct
import threading
import time

import pytest

from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.engines import native
from supermachine_jupyter.image import Image
from supermachine_jupyter.snapshots.format import (
    Snapshot,
    SnapshotError,
    SnapshotTimeoutError,
    encode_header,
    file_sha256,
)

NATIVE = VmConfig(engine="native", memory_mib=64)


@pytest.fixture(scope="module")
def probe_image() -> Image:
    ok, why = native.available()
    if not ok:
        pytest.skip(f"the native core cannot run here: {why}")
    probe = native.probe_path("agent")
    return Image(probe, probe, probe, description="agent probe guest")


def count(vm) -> int:
    result = vm.run("count")
    assert result.ok, result
    return int(result.stdout)


@pytest.fixture(scope="module")
def source(probe_image):
    vm = probe_image.start(NATIVE, name="nsnapsrc")
    assert count(vm) == 1
    yield vm
    vm.stop(timeout=5)


@pytest.fixture(scope="module")
def snap(source, tmp_path_factory) -> Snapshot:
    return source.snapshot(tmp_path_factory.mktemp("nsnaps") / "s1")


def test_snapshot_holds_the_cores_files_and_the_source_goes_on(source, snap):
    assert snap.engine == "native" and snap.accel == "kvm"
    assert set(snap.header["files"]) == {"state.bin", "memory.bin"}
    assert snap.header["engine_state"]["core_version"] == native.version()
    assert snap.memory_mib == 64
    # memory.bin is as long as guest RAM but sparse: the probe touched little of it.
    memory = snap.path / "memory.bin"
    assert memory.stat().st_size == 64 * 2**20
    assert memory.stat().st_blocks * 512 < 16 * 2**20
    assert count(source) == 2


def test_restores_continue_from_the_snapshot_and_are_independent(snap):
    image = Image.from_snapshot(snap.path)
    a = image.start(name="nrest-a")
    b = image.start(name="nrest-b")
    try:
        assert a.engine == b.engine == "native" and a.restored_from == snap.path
        # Both start from the snapshot's counter (1), not the source's current one.
        assert count(a) == 2
        assert count(a) == 3
        assert count(b) == 2
        assert a.run("hostname").stdout.strip() == "nrest-a"
        assert b.run("hostname").stdout.strip() == "nrest-b"
        assert list(a.restore_timings)[-1] == "guest_refreshed"
        # The agent's old vsock connection died with the source's host side: the core told
        # the guest (transport reset) and the host connected anew.
        assert a.instance.vm.device("virtio-vsock")["counters"]["transport_resets"] == 1
    finally:
        a.stop(timeout=5)
        b.stop(timeout=5)


def test_a_second_snapshot_of_a_restored_vm_restores(snap, tmp_path):
    with Image.from_snapshot(snap.path).start(name="nrest-c") as vm:
        assert count(vm) == 2
        again = vm.snapshot(tmp_path / "s2")
    with Image.from_snapshot(again.path).start(name="nrest-d") as vm:
        assert count(vm) == 3


def test_restore_timeout_is_honoured_and_nothing_is_left_running(snap):
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(SnapshotTimeoutError) as info:
        Image.from_snapshot(snap.path).start(VmConfig(restore_timeout=0.001))
    message = str(info.value)
    assert "snapshot" in message and "restore_timeout=0.001" in message
    assert "VmConfig(restore_timeout=" in message
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 3
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads


def _clone(snap: Snapshot, target) -> Snapshot:
    shutil.copytree(snap.path, target)
    return Snapshot.open(target)


def _rewrite_header(snap: Snapshot) -> None:
    """Make the header agree with the files again (after a deliberate change)."""
    files = snap.header["files"]
    files["state.bin"] = {"size": (snap.path / "state.bin").stat().st_size,
                          "sha256": file_sha256(snap.path / "state.bin")}
    (snap.path / "header").write_bytes(encode_header(snap.header))


def test_corrupted_state_is_refused_before_anything_runs(snap, tmp_path):
    clone = _clone(snap, tmp_path / "bad")
    data = bytearray((clone.path / "state.bin").read_bytes())
    data[200] ^= 0xFF
    (clone.path / "state.bin").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="snapshot .* is corrupted: state.bin"):
        Image.from_snapshot(clone.path).start()


def test_the_cores_own_checks_refuse_another_format_version(snap, tmp_path):
    # The header is made consistent again, so the core's reader is the one that refuses.
    clone = _clone(snap, tmp_path / "v99")
    data = bytearray((clone.path / "state.bin").read_bytes())
    struct.pack_into("<I", data, 8, 99)            # sm_snapshot_header.format_version
    (clone.path / "state.bin").write_bytes(bytes(data))
    _rewrite_header(clone)
    with pytest.raises(SnapshotError, match="unsupported format version") as info:
        Image.from_snapshot(clone.path).start()
    assert "snapshot" in str(info.value) and "version 99" in str(info.value)


def test_truncated_memory_is_refused(snap, tmp_path):
    clone = _clone(snap, tmp_path / "short")
    with open(clone.path / "memory.bin", "r+b") as f:
        f.truncate(2**20)
    with pytest.raises(SnapshotError, match="truncated: memory.bin"):
        Image.from_snapshot(clone.path).start()


def test_a_snapshot_restores_only_on_its_engine(snap):
    with pytest.raises(SnapshotError, match=r"engine='qemu' \(snapshot made by 'native'\)"):
        Image.from_snapshot(snap.path).start(VmConfig(engine="qemu"))


def test_volumes_are_copied_and_each_restore_writes_its_own(probe_image, tmp_path):
    volume = tmp_path / "data.img"
    config = NATIVE.with_volume(str(volume), "/data", size_mib=8)
    with probe_image.start(config, name="nvolsrc") as vm:
        snap = vm.snapshot(tmp_path / "vs")
    original = volume.read_bytes()
    assert snap.header["volumes"][0]["file"] == "volume0.img"
    assert (snap.path / "volume0.img").read_bytes() == original
    with Image.from_snapshot(snap.path).start(name="nvol-a") as a:
        path = a._spec.volumes[0].path
        assert path.parent == a._spec.run_dir and path.read_bytes() == original
        assert a.instance.vm.device("virtio-blk0")["broken"] == 0
        assert count(a) == 1


def test_a_volume_file_outside_the_snapshot_is_refused(probe_image, tmp_path):
    # A header re-signed after pointing its volume at a host file: nothing of it may reach
    # the guest, and no VM starts.
    with probe_image.start(NATIVE.with_volume(str(tmp_path / "d.img"), "/data", size_mib=8),
                           name="nvolevil") as vm:
        snap = vm.snapshot(tmp_path / "evil")
    secret = tmp_path / "host-secret.img"
    secret.write_bytes(b"host only" * 1000)
    snap.header["volumes"][0]["file"] = str(secret)
    (snap.path / "header").write_bytes(encode_header(snap.header))
    with pytest.raises(SnapshotError, match="is not one of its files"):
        Image.from_snapshot(snap.path).start()
    snap.header["volumes"][0]["file"] = "volume0.img"
    (snap.path / "volume0.img").unlink()
    (snap.path / "volume0.img").symlink_to(secret)
    (snap.path / "header").write_bytes(encode_header(snap.header))
    with pytest.raises(SnapshotError, match="volume0.img is a symbolic link"):
        Image.from_snapshot(snap.path).start()


def test_vm_with_mounts_snapshots_and_restores_with_them_reattached(probe_image, tmp_path):
    """The native engine carries mounts across a snapshot: a restore re-attaches the
    snapshot's host folders (or the ones its config gives, same tags and guest paths), a
    restore config with other mounts is refused, and a host folder that is gone is named."""
    from supermachine_jupyter.config import MountSpec
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    with probe_image.start(NATIVE.with_virtiofs(str(shared), "share", "/mnt/share"),
                           name="nfssrc") as vm:
        assert count(vm) == 1
        snap = vm.snapshot(tmp_path / "withmount")
    assert snap.header["config"]["mounts"][0]["host_path"] == str(shared)
    with Image.from_snapshot(snap.path).start(name="nfs1") as same:
        assert count(same) == 2                                   # the snapshot's memory
        assert [m.spec for m in same.mounts()] == [MountSpec(str(shared), "share", "/mnt/share")]
        assert same.instance.vm.device("virtio-fs0")["virtio_device_id"] == 26
    moved = VmConfig(mounts=[MountSpec(str(elsewhere), "share", "/mnt/share")])
    with Image.from_snapshot(snap.path).start(moved, name="nfs2") as other:
        assert count(other) == 2
        assert [m.spec.host_path for m in other.mounts()] == [str(elsewhere)]
    renamed = VmConfig(mounts=[MountSpec(str(elsewhere), "other", "/mnt/share")])
    with pytest.raises(SnapshotError, match="mounts differ from the snapshot's"):
        Image.from_snapshot(snap.path).start(renamed)
    shared.rmdir()
    with pytest.raises(SnapshotError, match=f"mount 'share' re-attaches host folder {shared}, "
                                            "which is not a directory here"):
        Image.from_snapshot(snap.path).start()


def test_pre_booted_snapshot_cache_on_the_native_engine(probe_image, tmp_path, monkeypatch):
    from supermachine_jupyter.snapshots import cache as snapmod, store
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path)
    with probe_image.start(NATIVE, name="ncache1", snapshot_cache=True) as first:
        assert first.restored_from is None
        assert count(first) == 1
    assert snapmod.wait_for_background(30)
    made = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(made) == 1 and Snapshot.open(made[0]).engine == "native"
    with probe_image.start(NATIVE, name="ncache2", snapshot_cache=True) as second:
        assert second.restored_from == made[0] and second.engine == "native"
        # Taken before the first VM ran anything: the counter starts afresh.
        assert count(second) == 1
        assert second.run("hostname").stdout == "ncache2\n"
    # Another kernel's snapshot of the same engine is stale and goes; another engine's stays.
    stale, other_engine = tmp_path / "default-0000000000000000", tmp_path / "default-1111"
    for path, change in ((stale, {"kernel_sha256": "0" * 64}),
                         (other_engine, {"kernel_sha256": "0" * 64, "engine": "qemu",
                                         "engine_state": {"qemu_version": "7.2.0"}})):
        shutil.copytree(made[0], path)
        header = Snapshot.open(path).header | change
        (path / "header").write_bytes(encode_header(header))
    snapmod._prune_stale_defaults(Snapshot.open(made[0]))
    assert not stale.exists() and other_engine.exists() and made[0].exists()


def test_vm_magic_saves_and_starts_named_native_snapshots(probe_image, tmp_path, monkeypatch,
                                                         capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    from supermachine_jupyter.snapshots import store
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path)
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    shell.user_ns["probe_config"] = NATIVE.with_assets(probe_image.kernel, probe_image.initrd)
    try:
        shell.run_cell_magic("vm", "--engine native --config probe_config --name nmagic "
                             "--snapshot nsaved", "count")
        out = capsys.readouterr().out
        assert "1\n" in out and "saved nmagic as snapshot 'nsaved'" in out
        shell.run_cell_magic("vm", "--from nsaved --name nmagic2", "count\nhostname")
        out = capsys.readouterr().out
        assert "2\nnmagic2\n" in out
        assert "✓ nmagic2: exit 0 after" in out and "VM restored in" in out
        shell.run_line_magic("vm", "snapshots")
        assert "nsaved" in capsys.readouterr().out
    finally:
        shell.run_line_magic("vm", "stop nmagic nmagic2")
