"""Tests of the guest asset builder (issue A): reproducible initramfs, cached kernel, CLI."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supermachine_jupyter.guest import assets
from supermachine_jupyter.guest.assets import CpioEntry, pack_cpio

REPO = Path(__file__).resolve().parent.parent


def parse_newc(archive: bytes) -> dict[str, dict]:
    """A tiny reader of gzip'd ``newc`` cpio archives: name -> header fields and data."""
    raw = gzip.decompress(archive)
    entries, pos = {}, 0
    names = ["ino", "mode", "uid", "gid", "nlink", "mtime", "size", "devmajor", "devminor",
             "rdevmajor", "rdevminor", "namesize", "check"]

    def align(n: int) -> int:
        return (n + 3) & ~3

    while True:
        assert raw[pos:pos + 6] == b"070701", f"bad cpio magic at {pos}"
        fields = {k: int(raw[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i, k in enumerate(names)}
        name_end = pos + 110 + fields["namesize"]
        assert raw[name_end - 1] == 0
        name = raw[pos + 110:name_end - 1].decode()
        pos = align(name_end)
        fields["data"] = raw[pos:pos + fields["size"]]
        pos = align(pos + fields["size"])
        if name == "TRAILER!!!":
            assert raw[pos:].strip(b"\0") == b""
            return entries
        assert name not in entries, f"{name} twice"
        entries[name] = fields


SAMPLE = [
    CpioEntry("bin", stat.S_IFDIR | 0o755),
    CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF pretend busybox" * 100),
    CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
    CpioEntry("dev", stat.S_IFDIR | 0o755),
    CpioEntry("dev/console", stat.S_IFCHR | 0o600),
    CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
    CpioEntry("tmp", stat.S_IFDIR | 0o1777),
]


def test_pack_cpio_is_reproducible_and_order_independent():
    first = pack_cpio(SAMPLE)
    assert pack_cpio(SAMPLE) == first
    shuffled = SAMPLE[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert pack_cpio(shuffled) == first
    assert pack_cpio(SAMPLE[:-1]) != first


def test_pack_cpio_gzip_header_has_no_time_or_name():
    archive = pack_cpio(SAMPLE)
    assert archive[:3] == b"\x1f\x8b\x08"          # gzip, deflate
    assert archive[3] & 0x08 == 0                  # no FNAME field (gzip -n)
    assert archive[4:8] == b"\0\0\0\0"             # MTIME 0


def test_pack_cpio_round_trips_headers_and_data():
    entries = parse_newc(pack_cpio(SAMPLE))
    assert list(entries) == sorted(e.path for e in SAMPLE)
    for entry in SAMPLE:
        got = entries[entry.path]
        assert got["mode"] == entry.mode and got["data"] == entry.data
        assert (got["uid"], got["gid"], got["mtime"]) == (0, 0, 0)
    assert len({e["ino"] for e in entries.values()}) == len(SAMPLE)


def test_initramfs_entries_list_what_the_guest_needs():
    entries = parse_newc(pack_cpio(assets.initramfs_entries(b"\x7fELF fake agent")))
    for path in ["init", "bin/busybox", "sbin/supermachine-agent", "dev/console", "bin/sh",
                 "proc", "sys", "tmp", "etc/passwd"]:
        assert path in entries, path
    assert entries["sbin/supermachine-agent"]["data"] == b"\x7fELF fake agent"
    assert entries["init"]["data"] == (assets.guest_source_dir() / "init").read_bytes()
    assert entries["init"]["mode"] == stat.S_IFREG | 0o755
    assert stat.S_ISCHR(entries["dev/console"]["mode"])
    assert entries["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert stat.S_ISLNK(entries["bin/sh"]["mode"]) and entries["bin/sh"]["data"] == b"busybox"
    for name in assets.BUSYBOX_LINKS:
        assert entries[f"bin/{name}"]["data"] == b"busybox"


def test_dev_console_is_the_console_device():
    console = parse_newc(pack_cpio(assets.initramfs_entries(b"agent")))["dev/console"]
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_tool_lists_the_archive():
    archive = pack_cpio(assets.initramfs_entries(b"agent"))
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=gzip.decompress(archive),
                             capture_output=True, check=True).stdout.decode().split("\n")
    assert sorted(filter(None, listing)) == sorted(parse_newc(archive))


def test_initramfs_builds_are_byte_identical(tmp_path, monkeypatch):
    real = assets.cache_dir() / f"initramfs-{assets.initramfs_key()}.cpio.gz"
    built = []
    for name in ("one", "two"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))
        result = assets.ensure_initramfs()
        assert result.built_now and result.path.is_relative_to(tmp_path / name)
        assert assets.ensure_initramfs() == assets.InitramfsBuild(result.path, built_now=False)
        built.append(result.path.read_bytes())
    assert built[0] == built[1]
    if real.is_file():                    # the user cache's copy, built from the same inputs
        assert real.read_bytes() == built[0]


def test_cached_kernel_is_not_rebuilt(monkeypatch):
    assets.ensure_kernel()                # builds only when the cache lacks this kernel
    real_run = subprocess.run
    calls = []

    def guarded_run(cmd, *args, **kwargs):
        calls.append(cmd)
        program = os.path.basename(str(cmd[0]))
        assert program not in ("make", "tar", "objcopy"), f"cached kernel rebuilt: {cmd}"
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(assets.subprocess, "run", guarded_run)
    started = time.monotonic()
    kernel = assets.ensure_kernel()
    elapsed = time.monotonic() - started
    assert kernel.built_now is False and kernel.seconds == 0.0
    assert kernel.bzimage.is_file() and kernel.vmlinux.is_file()
    assert kernel.directory.name == f"kernel-{assets.kernel_key()}"
    assert elapsed < 2.0, f"cache lookup took {elapsed:.1f} s"


def test_check_config_reports_dropped_options():
    config = "\n".join(["CONFIG_A=y", "# CONFIG_B is not set", "CONFIG_C=m", "CONFIG_S=\"x\"",
                        "# a comment"])
    wanted = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y", "CONFIG_D": "y",
              "CONFIG_E": "n", "CONFIG_S": "\"x\""}
    assert assets._check_config(config, wanted) == [
        "CONFIG_B=y (got n)", "CONFIG_C=y (got m)", "CONFIG_D=y (got unset)"]
    assert assets._check_config(config, {"CONFIG_A": "y", "CONFIG_B": "n"}) == []


def test_built_kernel_config_has_every_fragment_option():
    kernel = assets.ensure_kernel()
    fragment = assets._fragment_options((assets.guest_source_dir() / "kernel.config").read_text())
    assert len(fragment) > 20
    config = (kernel.directory / "config").read_text()
    assert assets._check_config(config, fragment) == []
    lines = set(config.splitlines())
    for key, value in fragment.items():
        if value == "n":
            assert f"{key}=y" not in lines and f"{key}=m" not in lines, key
        else:
            assert f"{key}={value}" in lines, key


def test_assets_cli_prints_the_paths():
    result = subprocess.run([sys.executable, "-m", "supermachine_jupyter", "assets"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    found = assets.find_assets()
    assert found is not None
    fields = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line}
    assert Path(fields["kernel"]) == found.kernel
    assert Path(fields["vmlinux"]) == found.vmlinux
    assert Path(fields["initrd"]) == found.initrd
