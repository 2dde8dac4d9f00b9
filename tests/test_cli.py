"""``python -m supermachine_jupyter``: ``run`` and ``doctor`` as a user runs them, in a
subprocess, with real VMs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supermachine_jupyter", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_run_restores_from_the_prebooted_snapshot_and_exits_with_the_guest_status():
    # The first run makes the pre-booted snapshot when it is missing (finished at exit);
    # later runs restore from it, as %%vm cells do.
    first = cli("run", "echo warm-up")
    assert first.returncode == 0, first.stderr
    second = cli("run", "echo from-the-guest; exit 3")
    assert second.returncode == 3, second.stderr
    assert second.stdout == "from-the-guest\n"
    assert "restored in" in second.stderr and "pre-booted snapshot" in second.stderr, second.stderr


def test_run_fresh_boots():
    fresh = cli("run", "--fresh", "uname -s")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout == "Linux\n"
    assert "booted in" in fresh.stderr and "restored" not in fresh.stderr, fresh.stderr


def test_run_with_an_interpreter_gets_the_script_on_its_stdin():
    # As %%vm INTERPRETER: the program (here sh with arguments of its own) reads the script.
    result = cli("run", "--interpreter", "sh -s -- one two", 'echo "got $1 $2"; exit 4')
    assert result.returncode == 4, result.stderr
    assert result.stdout == "got one two\n"


def test_doctor_announces_each_check_while_it_runs():
    proc = subprocess.Popen([sys.executable, "-m", "supermachine_jupyter", "doctor", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: list[tuple[float, bytes]] = []

    def read_stderr() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append((time.monotonic(), chunk))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = proc.stdout.read()          # stderr is the reader's alone
    proc.wait(600)
    ended = time.monotonic()
    reader.join(10)
    assert proc.returncode == 0
    report = json.loads(stdout)                  # stdout stays the report alone
    progress = b"".join(chunk for _, chunk in chunks).decode()
    lines = progress.splitlines()
    assert lines and all(line.startswith("◷ ") and line.endswith(" s") for line in lines), progress
    assert any("KVM" in line for line in lines) and any("QEMU" in line for line in lines)
    if report["native"]["available"]:
        for probe in report["native"]["probes"]:
            assert any(f"probe guest {probe}…" in line for line in lines), (probe, progress)
    # The first check was announced as soon as it started, not with the report at the end.
    first_seen = chunks[0][0]
    assert chunks[0][1].decode().startswith("◷ KVM")
    checks_took = sum(float(line.rsplit(" ", 2)[-2]) for line in lines)
    assert ended - first_seen >= 0.8 * checks_took - 0.5, (
        f"progress came only at the end: first line {ended - first_seen:.1f} s before the "
        f"exit, checks took {checks_took:.1f} s")
