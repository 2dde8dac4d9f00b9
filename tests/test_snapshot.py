"""Snapshots on the QEMU engine: save, restore, independence, refusals, timeout, volumes.

Real QEMU/TCG guests throughout. One source VM is booted and snapshotted per module; each
restore is a new QEMU process that loads that snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from supermachine_jupyter.snapshots import cache, store
from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.image import Image
from supermachine_jupyter.snapshots.format import (
    FORMAT_VERSION,
    MAGIC,
    Snapshot,
    SnapshotError,
    SnapshotTimeoutError,
    SnapshotVersionError,
    encode_header,
)
from tests.helpers import engine_pids

QEMU = VmConfig(engine="qemu")


@pytest.fixture(scope="module")
def source(guest_image):
    """A running VM with state in its memory: a file in /tmp and a background shell whose
    variable lives only in that shell's memory."""
    vm = guest_image.start(QEMU, name="snapsrc")
    assert vm.run("echo before-snapshot > /tmp/state.txt").ok
    # The variable exists only in this shell's memory; SIGUSR1 makes it write it out.
    vm.run("(V=kept-in-memory-$$; trap 'echo $V > /tmp/var.txt' USR1; "
           "while :; do sleep 0.1; done) >/dev/null 2>&1 & echo $! > /tmp/holder.pid")
    yield vm
    vm.stop(timeout=5)


@pytest.fixture(scope="module")
def snap(source, tmp_path_factory) -> Snapshot:
    return source.snapshot(tmp_path_factory.mktemp("snaps") / "s1")


@pytest.fixture(scope="module")
def snap_image(snap) -> Image:
    return Image.from_snapshot(snap.path)


def my_qemus() -> set[int]:
    """QEMU processes this test process started (other sessions may run their own)."""
    mine = set()
    for pid in engine_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    mine.add(pid)
        except OSError:
            pass
    return mine


def _clone(snap: Snapshot, target: Path, copy: tuple[str, ...] = ()) -> Path:
    """A copy of a snapshot directory: hard links, except real copies of ``copy``."""
    target.mkdir()
    for entry in snap.path.iterdir():
        if entry.name in copy:
            subprocess.run(["cp", "--sparse=always", str(entry), str(target / entry.name)],
                           check=True)
        else:
            os.link(entry, target / entry.name)
    return target


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _rewrite_header(path: Path, change) -> None:
    """Edit a header's JSON and re-sign it (a well-formed header with other contents)."""
    lines = (path / "header").read_bytes().split(b"\n")
    fields = json.loads(lines[1])
    change(fields)
    (path / "header").write_bytes(encode_header(fields))


# -- writing -------------------------------------------------------------------------------

def test_snapshot_header_records_format_engine_config_and_assets(snap, source):
    raw = (snap.path / "header").read_bytes()
    assert raw.startswith(f"{MAGIC} {FORMAT_VERSION}\n".encode())
    h = snap.header
    assert h["engine"] == "qemu" and h["engine_state"]["qemu_version"]
    assert h["config"] == source.config.to_dict()
    assert (h["memory_mib"], h["vcpus"]) == (source.memory_mib, source.vcpus)
    for asset in ("kernel", "initrd"):
        data = Path(h[asset]).read_bytes()
        assert h[f"{asset}_sha256"] == hashlib.sha256(data).hexdigest()
    assert re.match(r"\d{4}-\d\d-\d\dT", h["created_at"])
    state, ram = h["engine_state"]["state_file"], h["engine_state"]["ram_file"]
    assert set(h["files"]) == {state, ram}
    # Guest RAM is a sparse file of the VM's size; the state stream is small.
    assert (snap.path / ram).stat().st_size == source.memory_mib * 2**20
    assert (snap.path / state).stat().st_size < 16 * 2**20


def test_source_vm_keeps_running_after_snapshot(source, snap):
    assert source.state == "running"
    assert source.run("cat /tmp/state.txt").stdout == "before-snapshot\n"


def test_snapshot_refuses_existing_path_unless_overwrite(source, snap):
    with pytest.raises(SnapshotError, match="already exists"):
        source.snapshot(snap.path)


# -- restoring -----------------------------------------------------------------------------

def test_restore_continues_guest_memory_state(snap_image, source):
    source.run("echo written-after > /tmp/state.txt")   # not in the snapshot
    with snap_image.start(VmConfig(), name="restored1") as vm:
        assert vm.restored_from is not None and vm.engine == "qemu"
        assert vm.run("cat /tmp/state.txt").stdout == "before-snapshot\n"
        # A process that was running at the snapshot still runs, with its memory.
        r = vm.run("kill -USR1 $(cat /tmp/holder.pid); sleep 0.5; cat /tmp/var.txt")
        assert r.stdout.startswith("kept-in-memory-"), r
        assert vm.run("hostname").stdout == "restored1\n"
        guest_now = int(vm.run("date +%s").stdout)
        assert abs(guest_now - time.time()) < 5       # the clock was set on restore
        assert "restored from snapshot" in vm.console_output()
    source.run("echo before-snapshot > /tmp/state.txt")


def test_two_restores_are_independent(snap_image):
    a = snap_image.start(VmConfig(), name="twin-a")
    b = snap_image.start(VmConfig(), name="twin-b")
    try:
        assert a.name != b.name and a._spec.run_dir != b._spec.run_dir
        assert set(a.instance.process_ids()).isdisjoint(b.instance.process_ids())
        assert a.run("echo only-in-a > /tmp/state.txt").ok
        assert b.run("cat /tmp/state.txt").stdout == "before-snapshot\n"
        assert b.run("echo only-in-b > /tmp/b.txt").ok
        assert a.run("cat /tmp/b.txt").exit_code != 0
        assert a.run("cat /tmp/state.txt").stdout == "only-in-a\n"
    finally:
        a.stop()
        b.stop()


def test_restore_refuses_other_hardware(snap_image):
    with pytest.raises(SnapshotError, match="memory_mib=512"):
        snap_image.start(VmConfig(memory_mib=512))


def test_restore_timeout_is_honoured_and_cleans_up(snap_image):
    before = my_qemus()
    started = time.monotonic()
    with pytest.raises(SnapshotTimeoutError) as info:
        snap_image.start(VmConfig(restore_timeout=0.05))
    message = str(info.value)
    assert "snapshot" in message and "restore_timeout=0.05" in message
    assert "VmConfig(restore_timeout=" in message
    assert time.monotonic() - started < 5
    time.sleep(0.3)
    assert my_qemus() <= before


def test_snapshot_restores_only_on_its_engine(snap_image):
    with pytest.raises(SnapshotError, match=r"engine='native' \(snapshot made by 'qemu'\)"):
        snap_image.start(VmConfig(engine="native"))


# -- refusals --------------------------------------------------------------------------------

def _header_len(snap: Snapshot) -> int:
    return len((snap.path / "header").read_bytes())


CORRUPTIONS = {
    # name: (files to copy, how to damage the clone, expected words in the error)
    "header truncated": (("header",), lambda p, s: os.truncate(p / "header", _header_len(s) // 2),
                         "truncated"),
    "header magic flipped": (("header",), lambda p, s: _flip(p / "header", 2), "bad magic"),
    "header JSON byte flipped": (("header",), lambda p, s: _flip(p / "header", 60), "corrupted"),
    "header checksum flipped": (("header",), lambda p, s: _flip(p / "header", _header_len(s) - 5),
                                "checksum"),
    "other format version": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h.update(format_version=FORMAT_VERSION + 1)), "format version"),
    "other QEMU version": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h["engine_state"].update(qemu_version="6.0.0")), "QEMU 6.0.0"),
    "state stream truncated": (("qemu-state.migration",), lambda p, s: os.truncate(
        p / "qemu-state.migration", 1000), "truncated"),
    "state stream byte flipped": (("qemu-state.migration",), lambda p, s: _flip(
        p / "qemu-state.migration", 5000), "qemu-state.migration does not match"),
    "RAM byte flipped": (("qemu-ram.img",), lambda p, s: _flip(p / "qemu-ram.img", 1 << 20),
                         "qemu-ram.img does not match"),
    "RAM file missing": ((), lambda p, s: os.unlink(p / "qemu-ram.img"), "missing"),
    # Tampered headers, re-signed (the checksum is no secret): host input like any other.
    "header volume file outside the snapshot": (("header",), lambda p, s: _rewrite_header(
        p, _add_volume_file("/etc/passwd")), "'/etc/passwd' is not one of its files"),
    "header file name with ..": (("header",), lambda p, s: _rewrite_header(
        p, _list_file("../outside.img")), "'../outside.img', which is not a plain file name"),
    "header RAM file is a symbolic link": (("header",), lambda p, s: _swap_for_link(
        p / "qemu-ram.img"), "qemu-ram.img is a symbolic link"),
    "header field of the wrong type": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h.update(memory_mib="256")), "field memory_mib is str, not int"),
    "header without a state file": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h["engine_state"].pop("state_file")), "lacks engine_state.state_file"),
    "header files not an object": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h.update(files=[])), "field files is list"),
    "header volume entry not an object": (("header",), lambda p, s: _rewrite_header(
        p, lambda h: h.update(volumes=[5])), "volumes[0] is not an object"),
    "header config volumes that the snapshot does not hold": (("header",), lambda p, s:
        _rewrite_header(p, lambda h: h["config"].update(volumes=[{
            "host_path": "/etc/passwd", "guest_path": "/x", "size_mib": None,
            "read_only": True}])), "volumes do not match the volume files it lists"),
    "header JSON nested absurdly deep": (("header",), lambda p, s: _write_raw_header(
        p, b"[" * 200_000 + b"]" * 200_000), "header is not JSON"),
}


def _add_volume_file(file: str):
    def change(h: dict) -> None:
        h["volumes"] = [{"index": 0, "file": file, "serial": "smvol0", "guest_path": "/data",
                         "read_only": True, "host_path": file}]
    return change


def _list_file(name: str):
    def change(h: dict) -> None:
        h["files"][name] = {"size": 0, "digest": "x"}
    return change


def _swap_for_link(path: Path) -> None:
    outside = path.parent.parent / "outside-ram.img"
    os.rename(path, outside)
    os.symlink(outside, path)


def _write_raw_header(path: Path, body: bytes) -> None:
    (path / "header").write_bytes(f"{MAGIC} {FORMAT_VERSION}\n".encode() + body + b"\n"
                                  + f"sha256:{hashlib.sha256(body).hexdigest()}\n".encode())


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_snapshot_is_refused_with_reason(snap, tmp_path, case):
    copy, damage, words = CORRUPTIONS[case]
    clone = _clone(snap, tmp_path / "clone", copy)
    damage(clone, snap)
    before = my_qemus()
    with pytest.raises(SnapshotError) as info:
        Image.from_snapshot(clone).start(VmConfig(restore_timeout=20))
    message = str(info.value)
    assert "snapshot" in message and words in message, message
    if case.startswith(("header", "other", "state", "RAM file")):
        # Refused from the header and file checks, before any QEMU started.
        assert not (my_qemus() - before)
    if case.startswith("other"):
        assert isinstance(info.value, SnapshotVersionError)


def test_qemu_refusing_the_stream_surfaces_as_snapshot_error(snap, tmp_path):
    """A stream that passes our checks but QEMU cannot load (cut short, header re-signed)."""
    clone = _clone(snap, tmp_path / "clone", ("qemu-state.migration", "header"))
    state = clone / "qemu-state.migration"
    os.truncate(state, state.stat().st_size // 2)
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    _rewrite_header(clone, lambda h: h["files"]["qemu-state.migration"].update(
        size=state.stat().st_size, sha256=digest))
    before = my_qemus()
    started = time.monotonic()
    with pytest.raises(SnapshotError) as info:
        Image.from_snapshot(clone).start(VmConfig(restore_timeout=20))
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "snapshot" in message and "could not be restored" in message and "QEMU" in message
    time.sleep(0.3)
    assert my_qemus() <= before


# -- volumes and mounts ----------------------------------------------------------------------

def test_volumes_are_carried_and_each_restore_gets_its_own_copy(guest_image, tmp_path):
    disk = tmp_path / "data.img"
    config = QEMU.with_volume(str(disk), "/data", size_mib=32).with_balloon()
    with guest_image.start(config, name="volsrc") as vm:
        assert vm.run("echo at-snapshot > /data/f").ok
        snap = vm.snapshot(tmp_path / "volsnap")
        assert vm.run("echo source-later > /data/f && sync").ok
    assert set(snap.header["files"]) >= {"volume0.img"}
    original = hashlib.sha256(disk.read_bytes()).hexdigest()
    image = Image.from_snapshot(snap.path)
    a, b = image.start(name="vol-a"), image.start(name="vol-b")
    try:
        for vm in (a, b):
            # The guest's filesystem matches its memory: the snapshot-time contents.
            assert vm.run("cat /data/f").stdout == "at-snapshot\n"
            assert vm.config.volumes[0].guest_path == "/data"
            assert vm.balloon_stats().target_mib == 0
        assert a.run("echo from-a > /data/f && sync").ok
        assert b.run("cat /data/f").stdout == "at-snapshot\n"
        # A restored VM can be snapshotted in turn: its overlay is flattened into the copy.
        again = a.snapshot(tmp_path / "volsnap2")
    finally:
        a.stop()
        b.stop()
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == original   # never touched
    with Image.from_snapshot(again.path).start(name="vol-c") as c:
        assert c.run("cat /data/f").stdout == "from-a\n"


def test_vm_with_mounts_cannot_be_snapshotted(guest_image, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    with guest_image.start(QEMU.with_virtiofs(str(shared), "share", "/mnt/share")) as vm:
        with pytest.raises(SnapshotError, match="mounts") as info:
            vm.snapshot(tmp_path / "nope")
        assert "snapshot" in str(info.value) and "migratable" in str(info.value)
        assert vm.run("echo ok").stdout == "ok\n"
    assert not (tmp_path / "nope").exists()


# -- the default image's pre-booted snapshot ----------------------------------------------------

def test_default_snapshot_is_made_on_first_use_then_restored(guest_image, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path)
    config = QEMU.with_memory_mib(192)
    # First use boots (and snapshots the fresh VM before handing it over).
    with guest_image.start(config, name="first", snapshot_cache=True) as first:
        assert first.restored_from is None
        assert first.run("echo cell-one > /tmp/cell").ok
    assert cache.wait_for_background(60)
    made = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(made) == 1 and made[0].name.startswith("default-")
    with guest_image.start(config, name="second", snapshot_cache=True) as second:
        assert second.restored_from == made[0]
        assert (second.memory_mib, second.run("hostname").stdout) == (192, "second\n")
        # The snapshot was taken before the first VM ran anything.
        assert second.run("cat /tmp/cell").exit_code != 0
    assert Snapshot.open(made[0]).header["memory_mib"] == 192
    # Configs the snapshot cannot stand in for boot as usual.
    with guest_image.start(config.with_volume(str(tmp_path / "v.img"), "/v", 16),
                           snapshot_cache=True) as booted:
        assert booted.restored_from is None
    # Synchronous form: returns the cached one.
    assert cache.default_snapshot(guest_image, config).path == made[0]


def test_overwriting_a_snapshot_leaves_running_restores_intact(guest_image, tmp_path):
    with guest_image.start(QEMU, name="ow") as vm:
        vm.run("echo one > /tmp/gen")
        path = vm.snapshot(tmp_path / "ow").path
        restored = Image.from_snapshot(path).start(name="ow-r")
        vm.run("echo two > /tmp/gen")
        vm.snapshot(path, overwrite=True)
    try:
        # The running restore maps the old RAM file, which the overwrite did not change.
        assert restored.run("cat /tmp/gen").stdout == "one\n"
        with Image.from_snapshot(path).start(name="ow-r2") as fresh:
            assert fresh.run("cat /tmp/gen").stdout == "two\n"
    finally:
        restored.stop()
