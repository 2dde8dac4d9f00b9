"""The core under ASan + UBSan, and the virtqueue parser under a fuzz driver.

* The probe, exit, virtio-fs, snapshot and SMP tests run again in a subprocess against ``_native_asan`` (the
  same C built with ``-fsanitize=address,undefined``, UB fatal), with libasan preloaded.
* ``native/fuzz/fuzz_virtqueue.c`` (seeded, structure-aware generator; libFuzzer entry point
  too) feeds ≥ 100,000 inputs to the descriptor/ring parser, built with the same sanitizers.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import NATIVE, ROOT, ensure_built

FUZZ_INPUTS = 100_000
SANITIZER_ERRORS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer", "SUMMARY: UndefinedBehavior")


def _libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), f"libasan not found ({path!r}): install libasan8"
    return path


def test_probes_under_asan_ubsan():
    ensure_built(sanitize=True)
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": _libasan(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:handle_segv=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "SUPERMACHINE_NATIVE_MODULE": "_native_asan",
    })
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "native" / "test_probes.py"),
         str(ROOT / "tests" / "native" / "test_doorbells.py"),
         str(ROOT / "tests" / "native" / "test_exits.py"),
         str(ROOT / "tests" / "native" / "test_virtio_fs.py"),
         str(ROOT / "tests" / "native" / "test_snapshot_native.py"),
         str(ROOT / "tests" / "native" / "test_smp.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    print(output[-3000:])
    for marker in SANITIZER_ERRORS:
        assert marker not in output, output[-6000:]
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_fuzz_virtqueue_parser(tmp_path):
    binary = tmp_path / "fuzz_virtqueue"
    subprocess.run(
        ["gcc", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=undefined", "-o", str(binary),
         str(NATIVE / "fuzz" / "fuzz_virtqueue.c"),
         str(NATIVE / "src" / "devices" / "virtio_queue.c"), str(NATIVE / "src" / "memory.c")],
        check=True)
    seeds = [0x5EED, int.from_bytes(os.urandom(4), "little") | 1]
    for seed in seeds:
        proc = subprocess.run([str(binary), str(FUZZ_INPUTS), str(seed)], capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "ASAN_OPTIONS": "abort_on_error=1"})
        print(f"seed {seed:#x}:\n{proc.stdout}")
        assert proc.returncode == 0, f"seed {seed:#x}: {proc.stdout}\n{proc.stderr}"
        assert f"{FUZZ_INPUTS} inputs, no invariant violated" in proc.stdout
        # the generator reaches the parser's accepting path and every kind of rejection
        for needle in ("pop -> 0  ok", "loops", "outside guest RAM", "too large",
                       "beyond the queue size", "indirect"):
            assert needle in proc.stdout, (needle, proc.stdout)
