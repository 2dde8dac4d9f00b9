"""Volume files: formatted only when they hold nothing, refused otherwise, never resized.

``volumes.prepare`` runs host-side before any engine starts, so these tests need no VM: the
real ``mkfs.ext4`` formats real files; the data-keeping cases check the bytes afterwards.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from supermachine_jupyter.config import VolumeSpec
from supermachine_jupyter.devices.volumes import MIB, VolumeError, has_ext4, prepare


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_file_is_made_sparse_and_formatted(tmp_path):
    volume = prepare(VolumeSpec(tmp_path / "new.img", "/data", size_mib=16), 0)
    assert volume.formatted_now and volume.size_mib == 16 and volume.serial == "smvol0"
    assert has_ext4(volume.path) and volume.path.stat().st_size == 16 * MIB
    assert volume.path.stat().st_blocks * 512 < 16 * MIB       # sparse
    assert not list(tmp_path.glob(".*formatting"))


def test_default_size_is_1024_mib_for_a_new_file(tmp_path):
    volume = prepare(VolumeSpec(tmp_path / "new.img", "/data"), 0)
    assert volume.path.stat().st_size == 1024 * MIB


def test_an_existing_ext4_volume_is_reused_untouched(tmp_path):
    path = tmp_path / "v.img"
    prepare(VolumeSpec(path, "/data", size_mib=8), 0)
    before = digest(path)
    again = prepare(VolumeSpec(path, "/data"), 1)          # size_mib unset: the file's own
    assert not again.formatted_now and digest(path) == before
    assert prepare(VolumeSpec(path, "/data", size_mib=8), 0).formatted_now is False


def test_a_size_that_differs_from_the_existing_volume_is_refused(tmp_path):
    path = tmp_path / "v.img"
    prepare(VolumeSpec(path, "/data", size_mib=8), 0)
    before = digest(path)
    with pytest.raises(VolumeError, match=r"is 8 MiB, but its VolumeSpec asks for "
                                          r"size_mib=16: volumes are never resized"):
        prepare(VolumeSpec(path, "/data", size_mib=16), 0)
    assert digest(path) == before


@pytest.mark.parametrize("zero_head_kib", [0, 4, 32, 1024])
def test_a_file_with_data_that_is_not_ext4_is_never_formatted(tmp_path, zero_head_kib):
    # An ISO 9660 image starts with 32 KiB of zeros; a look at the first 4 KiB is not enough.
    path = tmp_path / "image.iso"
    with open(path, "wb") as f:
        f.write(bytes(zero_head_kib * 1024))
        f.write(b"CD001 precious data" * 100)
    before = digest(path)
    with pytest.raises(VolumeError, match="holds data that is not ext4; refusing to format"):
        prepare(VolumeSpec(path, "/data"), 0)
    assert digest(path) == before


def test_data_far_into_a_sparse_file_is_found(tmp_path):
    path = tmp_path / "sparse-with-data.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(40 * MIB)
        f.write(b"one block of data")
    with pytest.raises(VolumeError, match="holds data that is not ext4"):
        prepare(VolumeSpec(path, "/data"), 0)
    assert path.read_bytes()[40 * MIB:40 * MIB + 17] == b"one block of data"


def test_an_empty_or_all_hole_file_is_formatted(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    assert prepare(VolumeSpec(empty, "/data", size_mib=8), 0).formatted_now
    holes = tmp_path / "holes.img"
    with open(holes, "wb") as f:
        f.truncate(8 * MIB)
    assert prepare(VolumeSpec(holes, "/data"), 0).formatted_now and has_ext4(holes)


def test_a_read_only_volume_must_already_hold_ext4(tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(VolumeError, match="read-only volume .* does not exist"):
        prepare(VolumeSpec(missing, "/data", read_only=True), 0)
    assert not missing.exists()
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(VolumeError, match="read-only volume .* holds no file system"):
        prepare(VolumeSpec(empty, "/data", read_only=True), 0)
    assert empty.stat().st_size == 0


def test_a_directory_or_device_is_refused(tmp_path):
    (tmp_path / "dir.img").mkdir()
    with pytest.raises(Exception, match="directory"):
        prepare(VolumeSpec(tmp_path / "dir.img", "/data"), 0)
    link = tmp_path / "null.img"
    os.symlink("/dev/null", link)
    with pytest.raises(VolumeError, match="not a regular file"):
        prepare(VolumeSpec(link, "/data"), 0)


def test_a_file_name_that_looks_like_an_option_is_formatted_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    volume = prepare(VolumeSpec("-n", "/data", size_mib=8), 0)
    assert volume.formatted_now and has_ext4(tmp_path / "-n")
