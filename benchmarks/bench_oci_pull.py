"""OCI pull benchmark: pull + convert of the tests' Python image vs ``skopeo copy`` alone.

    python benchmarks/bench_oci_pull.py [--rounds 3] [--image python|busybox]

Starts Debian's docker-registry on 127.0.0.1 and pushes the Python test image of
tests/oci_registry.py (mmdebstrap'd python3-minimal, cached in the user cache). Then, in
``--rounds`` alternated rounds (the order flips each round), times:

- the floor: ``skopeo copy docker://REF oci:EMPTY_DIR:img`` (the download and digest checks
  every pull needs, nothing else);
- ``oci.pull(REF, pull="always")`` into an empty cache: resolve + the same copy + umoci unpack
  + mkfs.ext4 -d + owners, i.e. registry to bootable rootfs; its stages from the progress lines.

Target: pull + convert ≤ 1.5× the floor. For scale, ``gzip -dc`` of the layers alone: the
least any conversion to an uncompressed file system costs on top of the download. Also: a cached pull (pull="missing", no network),
and host disk per cached image (the sparse rootfs.ext4's allocated blocks + image.json) vs
the image's compressed size (its layers in the registry) and its unpacked size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import fmt, machine_line, row, table_header, timed

from supermachine_jupyter.guest import oci


def allocated(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks, sparse-aware)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--image", default="python", help="test image: python or busybox")
    args = parser.parse_args()
    from tests.oci_registry import (
        Registry,  # importable once common put the repo on sys.path
    )

    work = Path(tempfile.mkdtemp(prefix="bench-oci-"))
    registry = Registry(work / "registry").start().with_test_images(
        progress=lambda line: print(f"[image] {line}", file=sys.stderr))
    try:
        ref = registry.ref(args.image)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True, check=True).stdout)
        compressed = sum(layer["size"] for layer in manifest["layers"])

        floor, full, stages = [], [], {"resolve+pull": [], "unpack": [], "convert": []}
        gunzip = []
        blobs = Path(tempfile.mkdtemp(dir=work, prefix="blobs-"))
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", "oci:layout:img"], cwd=blobs, check=True)
        layer_files = [blobs / "layout" / "blobs" / "sha256" / layer["digest"].split(":")[1]
                       for layer in manifest["layers"]]

        def decompress_only():
            for blob in layer_files:
                with open(blob, "rb") as f:
                    subprocess.run(["gzip", "-dc"], stdin=f, stdout=subprocess.DEVNULL,
                                   check=True)

        def skopeo_copy():
            dest = Path(tempfile.mkdtemp(dir=work, prefix="floor-"))
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            "--override-os", "linux", "--override-arch", "amd64",
                            f"docker://{ref}", "oci:layout:img"], cwd=dest, check=True)
            shutil.rmtree(dest)

        caches = []

        def pull_convert():
            cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
            caches.append(cache)
            marks = {}
            started = time.perf_counter()

            def progress(line: str) -> None:
                for word in ("unpacking", "converting"):
                    if line.endswith(word) or f": {word}" in line:
                        marks.setdefault(word, time.perf_counter())
            oci.pull(ref, pull="always", tls_verify=False, cache_dir=cache, progress=progress)
            ended = time.perf_counter()
            stages["resolve+pull"].append(marks["unpacking"] - started)
            stages["unpack"].append(marks["converting"] - marks["unpacking"])
            stages["convert"].append(ended - marks["converting"])

        skopeo_copy()                                       # warm-up: page cache, registry
        for i in range(args.rounds):
            order = [(floor, skopeo_copy), (full, pull_convert), (gunzip, decompress_only)]
            for samples, fn in order if i % 2 == 0 else reversed(order):
                samples += timed(fn, 1)

        cached = timed(lambda: oci.pull(ref, tls_verify=False, cache_dir=caches[-1]), 20)
        entry = next(caches[-1].glob("sha256-*"))
        disk = allocated(entry)
        apparent = (entry / "rootfs.ext4").stat().st_size
        unpacked = None
        tar = next(iter(sorted((Path(os.environ.get("XDG_CACHE_HOME")
                                     or Path.home() / ".cache")
                                / "supermachine-jupyter" / "test-images").glob("python-*.tar"))),
                   None)
        if args.image == "python" and tar is not None:
            unpacked = tar.stat().st_size

        print(machine_line())
        skopeo = subprocess.run(["skopeo", "--version"], capture_output=True, text=True,
                                check=True).stdout.split()[-1]
        print(f"Image: the tests' {args.image} image ({len(manifest['layers'])} layer(s), "
              f"{compressed / 2**20:.1f} MiB compressed), registry on 127.0.0.1; "
              f"skopeo {skopeo}, {args.rounds} alternated rounds")
        print()
        print(table_header())
        print(row("floor: skopeo copy into an empty dir", floor))
        print(row("oci.pull: pull + unpack + ext4 (empty cache)", full))
        for name, samples in stages.items():
            print(row(f"  of which {name}", samples))
        print(row("oci.pull again (cached, no network)", cached))
        print(row("reference: gzip -dc of the layers alone", gunzip))
        ratio = statistics.median(full) / statistics.median(floor)
        print()
        print(f"pull + convert / floor (medians): {ratio:.2f}x (target <= 1.5x): "
              f"{fmt(statistics.median(full))} vs {fmt(statistics.median(floor))}")
        print(f"host disk per cached image: {disk / 2**20:.1f} MiB allocated "
              f"(rootfs.ext4 apparent size {apparent / 2**20:.0f} MiB, sparse) vs "
              f"{compressed / 2**20:.1f} MiB compressed"
              + (f", {unpacked / 2**20:.1f} MiB unpacked (tar)" if unpacked else "")
              + f": {disk / compressed:.2f}x the compressed size")
        return 0
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
