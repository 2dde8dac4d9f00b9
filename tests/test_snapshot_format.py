"""The snapshot header without a VM: what decode_header accepts and how it refuses the rest
(tests/test_snapshot.py does the same against real snapshots of real VMs)."""

from __future__ import annotations

import copy
import hashlib

import pytest

from supermachine_jupyter.snapshots.format import (FORMAT_VERSION, MAGIC, Snapshot,
                                                   SnapshotError, SnapshotVersionError,
                                                   decode_header, encode_header)

FIELDS = {
    "format_version": FORMAT_VERSION, "engine": "qemu", "created_at": "2026-11-30T00:00:00+00:00",
    "config": {"memory_mib": 256}, "memory_mib": 256, "vcpus": 1, "kernel": "/k",
    "initrd": "/i", "cmdline": "console=ttyS0", "balloon_target_mib": 0,
    "files": {"qemu-state.migration": {"size": 3, "sha256": "x"},
              "qemu-ram.img": {"size": 4, "digest": "y"},
              "volume0.img": {"size": 5, "digest": "z"}},
    "volumes": [{"index": 0, "file": "volume0.img", "serial": "smvol0", "read_only": False,
                 "guest_path": "/data", "host_path": "/somewhere/v.img"}],
    "engine_state": {"state_file": "qemu-state.migration", "ram_file": "qemu-ram.img"},
}


def changed(change) -> bytes:
    fields = copy.deepcopy(FIELDS)
    change(fields)
    return encode_header(fields)


def test_a_well_formed_header_round_trips():
    assert decode_header(encode_header(FIELDS), "s") == FIELDS


@pytest.mark.parametrize("change, words", [
    (lambda h: h["volumes"][0].update(file="/etc/shadow"), "is not one of its files"),
    (lambda h: h["files"].update({"../x": {"size": 1, "digest": "d"}}), "not a plain file name"),
    (lambda h: h["files"].update({"": {"size": 1, "digest": "d"}}), "not a plain file name"),
    (lambda h: h["engine_state"].update(ram_file="/dev/mem"), "is not one of its files"),
    (lambda h: h.update(memory_mib="256"), "field memory_mib is str, not int"),
    (lambda h: h.update(vcpus=True), "field vcpus is bool, not int"),
    (lambda h: h.update(memory_mib=0), "no memory or no vCPUs"),
    (lambda h: h.update(files=[]), "field files is list"),
    (lambda h: h["files"]["qemu-ram.img"].update(size=-1), "negative size"),
    (lambda h: h["files"]["qemu-ram.img"].pop("digest"), "neither a sha256 nor a digest"),
    (lambda h: h["files"]["qemu-state.migration"].update(sha256=None, digest="d"),
     "sha256 is NoneType"),
    (lambda h: h.update(volumes=[5]), "volumes[0] is not an object"),
    (lambda h: h["volumes"][0].update(read_only="no"), "read_only is str, not bool"),
    (lambda h: h.pop("engine_state"), "lacks engine_state"),
    (lambda h: h.update(balloon_target_mib=-5), "negative balloon size"),
])
def test_a_tampered_header_is_refused_naming_what(change, words):
    with pytest.raises(SnapshotError, match="corrupted") as info:
        decode_header(changed(change), "s")
    assert words in str(info.value)


def test_damage_and_versions_are_told_apart():
    good = encode_header(FIELDS)
    with pytest.raises(SnapshotError, match="bad magic"):
        decode_header(b"X" + good[1:], "s")
    with pytest.raises(SnapshotError, match="checksum does not match"):
        decode_header(good.replace(b'"vcpus":1', b'"vcpus":2'), "s")
    with pytest.raises(SnapshotError, match="truncated"):
        decode_header(good[:len(good) // 2], "s")
    with pytest.raises(SnapshotVersionError, match="format version 99"):
        decode_header(good.replace(f"{MAGIC} {FORMAT_VERSION}".encode(), f"{MAGIC} 99".encode()),
                      "s")
    body = b"[" * 100_000 + b"]" * 100_000
    deep = (f"{MAGIC} {FORMAT_VERSION}\n".encode() + body + b"\n"
            + f"sha256:{hashlib.sha256(body).hexdigest()}\n".encode())
    with pytest.raises(SnapshotError, match="not JSON"):
        decode_header(deep, "s")


def test_open_refuses_links_and_sizes_that_differ(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    fields = copy.deepcopy(FIELDS)
    for name, info in fields["files"].items():
        (snap / name).write_bytes(b"x" * info["size"])
    (snap / "header").write_bytes(encode_header(fields))
    assert Snapshot.open(snap).memory_mib == 256
    (snap / "volume0.img").unlink()
    (snap / "volume0.img").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"x" * 5)
    with pytest.raises(SnapshotError, match="volume0.img is a symbolic link"):
        Snapshot.open(snap)
    (snap / "volume0.img").unlink()
    (snap / "volume0.img").write_bytes(b"x" * 4)
    with pytest.raises(SnapshotError, match="truncated: volume0.img has 4 bytes"):
        Snapshot.open(snap)
