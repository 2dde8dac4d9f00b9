"""``%%vm --image`` cells: an OCI image's first and later cells → first output, vs the default
image's in the same run.

    python benchmarks/bench_oci_cells.py [--rounds 3] [--later 3]

Starts Debian's docker-registry on 127.0.0.1, pushes the tests' Python image
(tests/oci_registry.py: mmdebstrap'd python3-minimal, cached in the user cache) and pulls it
once into a temporary OCI cache (the pull itself is bench_oci_pull.py's). Then, in
``--rounds`` rounds with an empty pre-booted snapshot dir each, alternating which image goes
first, through the magic as a notebook runs it (QEMU, 256 MiB, 1 vCPU):

- the first ``%%vm`` cell of the image: boots it (and saves its pre-booted snapshot, after the
  output) → its first output line;
- ``--later`` later cells: restored from that snapshot → first output line;
- for the Python image also a later ``%%vm --image REF python3`` cell (the interpreter's own
  start-up on top).

Medians over all rounds. Disk per cached image is printed by bench_oci_pull.py.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from common import fmt, print_report_head, row
from IPython.testing.globalipapp import start_ipython

from supermachine_jupyter.snapshots import cache, store


class FirstLineClock(io.StringIO):
    """A stdout that notes when the line holding ``first`` arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_line_at: float | None = None

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.first_line_at is None and "first\n" in self.getvalue():
            self.first_line_at = time.perf_counter()
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--later", type=int, default=3, help="later cells a round (default 3)")
    args = parser.parse_args()
    from tests.oci_registry import (
        Registry,  # importable once common put the repo on sys.path
    )

    work = Path(tempfile.mkdtemp(prefix="bench-oci-cells-"))
    os.environ["SUPERMACHINE_OCI_CACHE"] = str(work / "oci-cache")
    os.environ["SUPERMACHINE_OCI_TLS_VERIFY"] = "0"       # the loopback registry: plain HTTP
    registry = Registry(work / "registry").start().with_test_images(
        progress=lambda line: print(f"[image] {line}", file=sys.stderr))
    try:
        ref = registry.ref("python")
        ip = start_ipython()
        ip.run_line_magic("load_ext", "supermachine_jupyter")
        ip.run_line_magic("config", "VmMagics.default_engine = 'qemu'")
        ip.run_line_magic("config", "VmMagics.snapshot_cache = True")
        with redirect_stdout(io.StringIO()):                 # warm-up, and the pull
            ip.run_cell_magic("vm", f"--quiet --image {ref}", "true")
            ip.run_cell_magic("vm", "--quiet", "true")

        def cell(options: str, body: str = "echo first; echo second") -> float:
            clock = FirstLineClock()
            started = time.perf_counter()
            with redirect_stdout(clock):
                ip.run_cell_magic("vm", f"--quiet {options}", body)
            if clock.first_line_at is None:
                raise RuntimeError(f"%%vm {options}: no first line in {clock.getvalue()!r}")
            return clock.first_line_at - started

        samples: dict[str, list[float]] = {key: [] for key in (
            "default first", "default later", "image first", "image later", "image python3")}

        def measure(kind: str, options: str) -> None:
            samples[f"{kind} first"].append(cell(options))
            if not cache.wait_for_background(timeout=120):
                raise RuntimeError("the pre-booted snapshot was not saved within 120 s")
            for _ in range(args.later):
                samples[f"{kind} later"].append(cell(options))
            if kind == "image":
                for _ in range(args.later):
                    samples["image python3"].append(
                        cell(f"{options} python3", "print('first')\nprint('second')"))

        for i in range(args.rounds):
            snaps = work / f"snapshots-{i}"
            snaps.mkdir()
            store.snapshots_dir = lambda snaps=snaps: snaps   # every first cell boots
            order = [("default", ""), ("image", f"--image {ref}")]
            for kind, options in order if i % 2 == 0 else reversed(order):
                measure(kind, options)
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        ip.run_line_magic("vm", "stop --all")

        print_report_head(f"VMs: engine qemu, 256 MiB, 1 vCPU; image: the tests' Python image "
                          f"(python3-minimal + dash) from a docker-registry on 127.0.0.1; "
                          f"{args.rounds} rounds alternating the images, {args.later} later "
                          "cells each")
        print(row("default image: first `%%vm` cell (boot) → first output", samples["default first"]))
        print(row("default image: later cell (restored) → first output", samples["default later"]))
        print(row("`%%vm --image`: first cell (boot) → first output", samples["image first"]))
        print(row("`%%vm --image`: later cell (restored) → first output", samples["image later"]))
        print(row("`%%vm --image … python3`: later cell (restored) → first output",
                  samples["image python3"]))
        med = {key: statistics.median(values) for key, values in samples.items()}
        print()
        print(f"image / default (medians): first cell {med['image first'] / med['default first']:.2f}x "
              f"({fmt(med['image first'])} vs {fmt(med['default first'])}), later cells "
              f"{med['image later'] / med['default later']:.2f}x "
              f"({fmt(med['image later'])} vs {fmt(med['default later'])})")
        return 0
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
