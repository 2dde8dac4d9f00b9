"""The teaching notebooks: executed end to end with nbclient on real VMs, checked by their output.

Each notebook in ``notebooks/`` must have an entry in ``EXPECTATIONS``: the lines its key cells
must print when they really run (not only "no exception"). An expectation names a cell by a
piece of its source and gives a regular expression its output must match, optionally with a
check on the match (``actual_pages`` reached 16384, and so on).

The cheap tests (no VM) also check that the committed notebooks are what
``tools/make_notebooks.py`` generates, keep outputs from a real run, open with "What you will
learn" and end with exercises.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 240
NOTEBOOK_NAMES = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))


@dataclasses.dataclass(frozen=True)
class Expect:
    """The first code cell whose source contains ``cell`` prints a match of ``pattern``
    (multi-line regex over its stream and text/plain outputs), and ``check(match)`` holds."""
    cell: str
    pattern: str
    check: Callable[[re.Match], bool] | None = None
    why: str = ""


def _at_least(group: int, minimum: float) -> Callable[[re.Match], bool]:
    return lambda match: float(match[group]) >= minimum


def _kvm_is_emulated() -> bool:
    from supermachine_jupyter.engines.accel import kvm_status
    from supermachine_jupyter.engines import native_available
    return native_available()[0] and kvm_status().speed == "emulated"


def _expectations_05() -> list[Expect]:
    expectations = [
        Expect("-m supermachine_jupyter doctor", r"^engine=auto\s+→ (qemu|native)/(tcg|kvm): auto"),
        Expect("choose_engine(requested)", r"^KVM speed: (hardware|emulated|absent|unusable)$"),
        Expect("choose_engine(requested)", r"^auto\s+→ (qemu|native)/(tcg|kvm): auto"),
        Expect("for run in range(1, 4)", r"^\s+3\s+(qemu|native)/(tcg|kvm)\s+\d+\.\d\ds"),
        Expect("for run in range(1, 4)", r"^median boot: (\d+\.\d+) s$",
               lambda m: 0 < float(m[1]) < 60, "boot times are measured"),
    ]
    if _kvm_is_emulated():
        # The workplace machines: KVM is kvm_pvm, Linux stops on xrstor.
        expectations += [
            Expect("native.calibrate()", r"ratio ([\d,]+)x → emulated",
                   lambda m: float(m[1].replace(",", "")) >= 3, "emulated KVM is slow"),
            Expect("first_uart_byte_seconds()", r"^median (\d+\.\d) ms$"),
            Expect("NativeVm(image.vmlinux", r"Linux version 6\.1"),
            Expect("NativeVm(image.vmlinux", r"^VM failed after [\d.]+ s: emulation_failure$"),
            Expect("def decode(", r"^→ xrstor64$"),
        ]
    return expectations


EXPECTATIONS: dict[str, Callable[[], list[Expect]]] = {
    "00-hello-vm": lambda: [
        Expect("%%vm\nuname -a", r"^Linux \S+ 6\.1"),
        Expect("%%vm\nuname -a", r"^✓ \S+: exit 0 after "),
        Expect("%%vm --name lab1\ncat /tmp/greeting", r"^hello$",
               why="a named VM keeps its files for the next cell"),
        Expect("%vm list", r"^lab1\s+running\s"),
        Expect("exit 3", r"^about to fail$"),
        Expect("exit 3", r"^✗ lab1: exit 3 after "),
        Expect("--timeout 2", r"^✗ lab1: timed out, command killed after "),
        Expect("still alive after the timeout", r"^still alive after the timeout$"),
        Expect("from supermachine_jupyter import Image", r"^from python$"),
        Expect("%vm stop lab1", r"^stopped lab1$"),
    ],
    "01-memory-and-balloon": lambda: [
        Expect("VmConfig(memory_mib=256, balloon=True", r"<Vm '\S+' engine=\S+ state=running "
               r"memory=256MiB"),
        Expect("stats = vm.balloon_stats()", r"^actual_pages\s+0$"),
        Expect("stats = vm.balloon_stats()", r"^free_memory\s+\d+$"),
        Expect("stats = vm.balloon_stats()", r"^hugetlb_allocations\s+None$",
               why="unreported statistics are None"),
        Expect("request_balloon_inflate(64)", r"^new target: 64 MiB$"),
        Expect("request_balloon_inflate(64)", r"balloon reached actual_pages=(\d+) \(64 MiB\)",
               _at_least(1, 16384), "inflating 64 MiB moves actual_pages by >= 16384"),
        Expect("rss_inflated = host_rss_mib()", r"host RSS fell by (-?\d+) MiB",
               _at_least(1, 32), "the host gets at least half the balloon back"),
        Expect("request_balloon_deflate(64)", r"balloon back to actual_pages=0 after"),
        Expect("panel = BalloonPanel(vm)", r"^BalloonPanel\(vm='\S+', interval=1, samples=\d+, "
               r"sampling\)$"),
        Expect("panel.inflate(64)", r"actual\s+64 MiB\s+target\s+64 MiB",
               why="the panel's samples follow the real balloon"),
        Expect("panel.inflate(64)", r"^samples so far: (\d+)$", _at_least(1, 5),
               "the panel kept sampling while the cell ran"),
        Expect("vm.stop()", r"^stopped$"),
    ],
    "07-balloon-in-class": lambda: [
        Expect("panel = BalloonPanel(vm)", r"^BalloonPanel\(vm='\S+', interval=1, samples=\d+, "
               r"sampling\)$"),
        Expect("count=120", r"host resident: \d+ MiB → \d+ MiB \(\+(\d+) MiB\)",
               _at_least(1, 60), "the host pays for memory the guest touched"),
        Expect("def settle(", r"^balloon 128 MiB · "),
        Expect("def settle(", r"guest available fell by (\d+) MiB",
               _at_least(1, 96), "the guest loses what the balloon takes"),
        Expect("def settle(", r"host resident fell by (\d+) MiB",
               _at_least(1, 64), "the host gets the ballooned memory back: the two move together"),
        Expect("settle(0)", r"^balloon   0 MiB · "),
        Expect("display(HTML(panel.chart.value))", r"^target changes marked: \[64, 128, 0\]$",
               why="a marker at each change of the target"),
        Expect("display(HTML(panel.chart.value))", r"^samples charted: (\d+)$",
               _at_least(1, 10), "the panel sampled through the whole lesson"),
        Expect("vm.stop()", r"^stopped$"),
    ],
    "02-volumes": lambda: [
        Expect("exists before the first VM", r"^exists before the first VM: False$"),
        Expect("with image.start(config) as vm", r"on /data type ext4 \(rw"),
        Expect("def disk_usage(path)", r"^data\.img: size 64 MiB, allocated on the host "
               r"(\d+\.\d) MiB", lambda m: float(m[1]) < 32, "the volume file is sparse"),
        Expect("two = config.with_volume", r"^data read back after restart: "
               r"written by the first VM$"),
        Expect("two = config.with_volume", r"^RAM file after restart: .*No such file"),
        Expect("two = config.with_volume", r"on /scratch type ext4 \(rw"),
        Expect("print(disk_usage(data_img))\nprint(disk_usage(scratch_img))",
               r"^scratch\.img: size 32 MiB, allocated on the host (\d+\.\d) MiB",
               _at_least(1, 8), "8 MiB written to /scratch are allocated on the host"),
        Expect("read_only = VmConfig", r"^written by the first VM$"),
        Expect("read_only = VmConfig", r"^write: 1 .*Read-only file system$"),
        Expect("read_only = VmConfig", r"^remount rw: [1-9]\d* "),
        Expect("%%vm --engine qemu --volume", r"^written by the first VM$"),
        Expect("%%vm --engine qemu --volume", r"^✓ \S+: exit 0 after "),
    ],
    "03-host-mounts": lambda: [
        Expect("mount | grep virtiofs", r"^share on /mnt/share type virtiofs \(rw"),
        Expect("mount | grep virtiofs", r"^reference on /mnt/reference type virtiofs \(ro"),
        Expect("guest reads:", r"^guest reads: hello from the host$"),
        Expect("guest reads:", r"^host reads:  hello from the guest$"),
        *[Expect("attempts = f", rf"^blocked {re.escape(label)}\s*: .*No such file")
          for label in ("..", "host path", "absolute symlink", "relative symlink")],
        Expect("attempts = f", r"\A(?!.*LEAK)", why="no escape printed LEAK"),
        Expect("innocent.txt", r"^inside the share\? False$"),
        Expect("cat /mnt/reference/data.csv", r"^exit 1: .*Read-only file system$"),
        Expect("cat /mnt/reference/data.csv", r"^reference on /mnt/reference type virtiofs \(rw"),
        Expect("cat /mnt/reference/data.csv", r"^host file unchanged: True$"),
        Expect("hashlib.md5", r"^share's bytes_read grew by (\d+\.\d\d) MiB$",
               _at_least(1, 2.0), "the mount counters count the 2 MiB read"),
        Expect("%%vm --engine qemu --mount", r"^hello from the guest$"),
        Expect("%%vm --engine qemu --mount", r"^data\.csv$"),
    ],
    "04-widgets-dashboard": lambda: [
        Expect("form = VmConfigForm(config)", r"^form edits this config object: True$"),
        Expect("form.memory.value = 384", r"^VmConfig\(memory_mib=384, balloon=True, "
               r"engine='qemu', name='dash-demo'\)$", why="widgets change the config"),
        Expect("config.memory_mib = 320", r"^slider: 320 · balloon box: False$",
               why="the config changes the widgets"),
        Expect("no spaces allowed", r"^form\.errors: \{'name': .VmConfig\.name must be"),
        Expect("no spaces allowed", r"^config\.name is still: dash-demo$"),
        Expect("no spaces allowed", r"^after fixing it, errors: \{\}$"),
        Expect("relative/path", r"^error: mounts row 1: MountSpec\.guest_path must be"),
        Expect("relative/path", r"^mounts in the config meanwhile: \['/mnt/share'\]$"),
        Expect("relative/path", r"^fixed: \{\} \['/mnt/share'\]$"),
        Expect("dashboard.start()", r"^<Vm 'dash-demo' engine=\S+ state=running memory=320MiB"),
        Expect("dashboard.balloon.inflate(64)", r"^hello through the mount panel$"),
        Expect("dashboard.balloon.inflate(64)", r"^balloon tab: actual 64 MiB of target 64 MiB"),
        Expect("dashboard.balloon.inflate(64)", r"^mounts tab: volume /data\s+smvol0 "),
        Expect("dashboard.balloon.inflate(64)", r"^mounts tab: mount\s+/mnt/share\s+share\s+"
               r"ops=(\d+)", _at_least(1, 1), "the mount counters move"),
        Expect("dashboard.balloon.inflate(64)", r"^panel threads alive: [1-9]"),
        Expect("dashboard.stop()", r"^VM: stopped · panel threads alive: 0$",
               why="stopping the VM ends the panels' threads"),
        Expect("--panel\n", r"VmDashboard\(vm='panel-demo' running"),
        Expect("--panel\n", r"^this cell's VM has a dashboard above$"),
        Expect("%vm panel panel-demo", r"^VmDashboard\(vm='panel-demo' running"),
        Expect("%vm stop panel-demo", r"^stopped panel-demo$"),
    ],
    "05-engines": _expectations_05,
    "06-snapshots": lambda: [
        Expect("source = image.start", r"^written before the snapshot$"),
        Expect("source = image.start", r"^\s*\d+ root\s+sh /tmp/counter\.sh$"),
        Expect("snap = source.snapshot(", r"^<Snapshot '.*' of 'source' qemu/\w+ 256MiB 1vCPU "),
        Expect("snap = source.snapshot(", r"^qemu-ram\.img\s+size 256\.0 MiB, allocated on the "
               r"host\s+(\d+\.\d) MiB$", lambda m: float(m[1]) < 200, "guest RAM is stored sparse"),
        *[Expect("snap_image = Image.from_snapshot", rf"^{name}: restored in \d+\.\d\d s from .*\n"
                 rf"hostname={name}\nwritten before the snapshot\n\s*\d+ root\s+sh /tmp/counter\.sh"
                 r"\ncount=(\d+)\none second later: (\d+)$", lambda m: int(m[2]) > int(m[1]),
                 "a clone has the source's file and process, and the process goes on counting")
          for name in ("clone-a", "clone-b")],
        Expect("counter_pid = ", r"^clone-a\s+only in clone-a · counter: (\d+) → (\d+)$",
               lambda m: m[1] == m[2], "clone-a's counter was stopped"),
        Expect("counter_pid = ", r"^clone-b\s+no /tmp/mine · counter: (\d+) → (\d+)$",
               lambda m: int(m[2]) > int(m[1]), "clone-b sees neither clone-a's file nor its kill"),
        Expect("counter_pid = ", r"^source\s+no /tmp/mine · counter: (\d+) → (\d+)$",
               lambda m: int(m[2]) > int(m[1])),
        Expect("def memory_mib(vm)", r"^the clones share (\d+) MiB that RSS counts twice$",
               _at_least(1, 8), "restored VMs share the snapshot's RAM pages"),
        Expect("vm.stop()\nprint([vm.state", r"^\['stopped', 'stopped', 'stopped'\]$"),
        Expect("def start_to_first_output", r"^median: cold boot (\d+\.\d\d) s · restore "
               r"(\d+\.\d\d) s", lambda m: float(m[2]) < float(m[1]), "a restore beats a cold boot"),
        Expect("last.restore_timings", r"^guest_refreshed\s+\d+\.\d ms$"),
        Expect("restore_timeout=0.001", r"^SnapshotTimeoutError: snapshot restore from .* took "
               r"longer than restore_timeout=0\.001 s"),
        Expect("def damaged_copy", r"^  SnapshotError: snapshot .*/flip_header_bytes is corrupted: "
               r"the header's checksum does not match"),
        Expect("def damaged_copy", r"^  SnapshotError: snapshot .*/truncate_ram is truncated: "
               r"qemu-ram\.img has"),
        Expect("def damaged_copy", r"^  SnapshotError: snapshot .*/flip_one_ram_byte is corrupted: "
               r"qemu-ram\.img does not match the digest"),
        Expect("def damaged_copy", r"\A(?!.*restored anyway)", why="no damaged snapshot restored"),
        Expect("%%vm --name a --snapshot s1", r"^saved a as snapshot 's1' \("),
        Expect("%%vm --name a --snapshot s1", r"^✓ a: exit 0 after .* · VM (booted|restored) in "),
        Expect("%%vm --name b --from s1", r"^b\nmade in VM a$"),
        Expect("%%vm --name b --from s1", r"^ticks: (\d+), a second later: (\d+)$",
               lambda m: int(m[2]) > int(m[1]), "the process started in a runs on in b"),
        Expect("%%vm --name b --from s1", r"^✓ b: exit 0 after [\d.]+ s · VM restored in "),
        Expect("%vm snapshots", r"^s1\s+256 MiB\s+1 vCPU\s+saved "),
        Expect("%vm stop a b", r"^stopped a\nstopped b$"),
        Expect("probe_image = Image(", r"^nsource counts: 1 2$"),
        Expect("probe_image = Image(", r"^<Snapshot '.*/native-snap' of 'nsource' native/kvm 64MiB "
               r"1vCPU "),
        Expect("probe_image = Image(", r"^files: memory\.bin, state\.bin$"),
        Expect("probe_image = Image(", r"^nsource goes on: 3$"),
        *[Expect("probe_image = Image(", rf"^{name}: restored in \d+ ms, counts 3 4$",
                 why="each native clone continues from the snapshot's counter, independently")
          for name in ("nclone-a", "nclone-b")],
        Expect("snapshot_cache=True", r"^start 1: first command done after [\d.]+ s: booted, and "
               r"saved the pre-booted snapshot$"),
        *[Expect("snapshot_cache=True", rf"^start {n}: first command done after [\d.]+ s: "
                 r"restored from default-\w+$") for n in (2, 3)],
    ],
}
# A notebook whose kernel outputs a "timed out" status line is fine; one that raises is not:
# nbclient stops at the first cell error and the test fails with that cell's traceback.


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "tools" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell_text(cell) -> str:
    """A code cell's printed output: streams (stdout and stderr) and text/plain results."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", "") + "\n")
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}\n")
    return "".join(parts)


def _find_cell(nb, source_piece: str):
    for cell in nb.cells:
        if cell.cell_type == "code" and source_piece in cell.source:
            return cell
    raise AssertionError(f"no code cell contains {source_piece!r}")


def _check(nb, name: str, expectations: list[Expect]) -> list[str]:
    """Every failed expectation, described with the cell's actual output."""
    failures = []
    for expect in expectations:
        cell = _find_cell(nb, expect.cell)
        text = _cell_text(cell)
        match = re.search(expect.pattern, text, re.MULTILINE | re.DOTALL
                          if expect.pattern.startswith(r"\A") else re.MULTILINE)
        if match is None or (expect.check is not None and not expect.check(match)):
            what = "no match" if match is None else f"check failed on {match[0]!r}"
            why = f" ({expect.why})" if expect.why else ""
            failures.append(f"{name}: cell containing {expect.cell!r}: {what} for "
                            f"{expect.pattern!r}{why}\n--- its output ---\n{text[-1500:]}")
    return failures


# -- without VMs ---------------------------------------------------------------------------------

def test_every_notebook_has_expectations():
    assert NOTEBOOK_NAMES, "notebooks/ holds no notebook"
    assert set(NOTEBOOK_NAMES) == set(EXPECTATIONS), (
        "each notebook needs output expectations in tests/test_notebooks.py "
        f"(missing: {sorted(set(NOTEBOOK_NAMES) - set(EXPECTATIONS))}; "
        f"no notebook for: {sorted(set(EXPECTATIONS) - set(NOTEBOOK_NAMES))})")


def test_committed_notebooks_match_their_generator():
    """tools/make_notebooks.py is the source; the committed cells must be what it writes."""
    generator = _load_generator()
    assert set(generator.BUILDERS) == set(NOTEBOOK_NAMES)
    for name, build in generator.BUILDERS.items():
        committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        expected = build()
        assert [(c.cell_type, c.source) for c in committed.cells] == \
            [(c.cell_type, c.source) for c in expected], (
                f"{name}.ipynb differs from tools/make_notebooks.py: run `python "
                f"tools/make_notebooks.py {name}` and execute it with --write")


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_shape_and_stored_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "What you will learn" in first.source
    assert last.cell_type == "markdown" and last.source.startswith("## Exercises")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    unexecuted = [cell.source.splitlines()[0] for cell in code if cell.execution_count is None]
    assert not unexecuted, (f"{name}: committed without outputs from a real run (execute with "
                            f"`python -m supermachine_jupyter notebook notebooks/{name}.ipynb "
                            f"--write`): {unexecuted}")
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name}: the stored run raised: {errors[0].ename}: {errors[0].evalue}"
    # The stored outputs pass the same checks as a live run.
    failures = _check(nb, name, EXPECTATIONS[name]())
    assert not failures, "\n\n".join(failures)


# -- executed on real VMs ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_and_teaches(name, guest_image):
    """Execute the notebook in a fresh python3 kernel (cwd = notebooks/) and check its output."""
    from nbclient import NotebookClient

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    nb = copy.deepcopy(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - started
    failures = _check(nb, name, EXPECTATIONS[name]())
    assert not failures, "\n\n".join(failures)
    print(f"{name}: executed in {elapsed:.1f} s")
