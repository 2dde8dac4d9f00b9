"""Native-core behaviours with Linux that issue H lists as failing today.

Marked ``nested_kvm_todo``: out of the default run (each says so when skipped); run them with
``SUPERMACHINE_NESTED_TODO=1 .venv/bin/python -m pytest tests/nested -v`` (or
``-m nested_kvm_todo``). Each one should pass once issue H item 2 is done; then move it into
``test_native_linux.py`` (marker ``nested_kvm``).
"""

from __future__ import annotations

import pytest

from supermachine_jupyter import Image, VmConfig

pytestmark = pytest.mark.nested_kvm_todo

NATIVE = VmConfig(engine="native")


# -- (1) snapshot / restore of a Linux guest -----------------------------------------------

@pytest.fixture(scope="module")
def snapshot_of_linux(image, tmp_path_factory):
    """A snapshot of a booted native VM whose guest wrote a file in RAM (/root)."""
    path = tmp_path_factory.mktemp("snaps") / "linux"
    with image.start(NATIVE.with_memory_mib(256), name="nested-snap-src") as vm:
        assert vm.run("echo before-snapshot > /root/mark").ok
        vm.snapshot(path)
    return path


def test_restored_linux_guest_answers_and_memory_continues(snapshot_of_linux):
    with Image.from_snapshot(snapshot_of_linux).start(NATIVE, name="nested-restored") as vm:
        assert vm.run("cat /root/mark").stdout == "before-snapshot\n"
        assert vm.run("uname -s").stdout == "Linux\n"


def test_two_restores_are_independent_and_a_restore_can_be_snapshotted(snapshot_of_linux,
                                                                        tmp_path):
    image = Image.from_snapshot(snapshot_of_linux)
    with image.start(NATIVE, name="nested-r1") as a, image.start(NATIVE, name="nested-r2") as b:
        assert a.run("echo a > /root/who").ok and b.run("echo b > /root/who").ok
        assert (a.run("cat /root/who").stdout, b.run("cat /root/who").stdout) == ("a\n", "b\n")
        a.snapshot(tmp_path / "of-restore")
    with Image.from_snapshot(tmp_path / "of-restore").start(NATIVE, name="nested-rr") as again:
        assert again.run("cat /root/who /root/mark").stdout == "a\nbefore-snapshot\n"


def test_unnamed_native_cells_use_the_prebooted_snapshot(capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from supermachine_jupyter.snapshots import cache as snapshot
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    try:
        shell.run_cell_magic("vm", "--engine native", "echo first")     # boots, makes the cache
        snapshot.wait_for_background(120)
        capsys.readouterr()
        shell.run_cell_magic("vm", "--engine native", "echo second")    # restores
        out = capsys.readouterr()
        assert "second" in out.out and "restore" in out.out, out
        assert "not used" not in out.out + out.err, out
    finally:
        shell.run_line_magic("vm", "stop --all")


# -- (2) vCPUs ---------------------------------------------------------------------------

@pytest.mark.parametrize("vcpus", [2])     # L1 has 2 CPUs; VmConfig caps vcpus at the host's
def test_guest_sees_its_vcpus(image, vcpus):
    with image.start(NATIVE.with_vcpus(vcpus), name=f"nested-cpus{vcpus}") as vm:
        assert vm.vcpus == vcpus
        assert vm.run("nproc").stdout == f"{vcpus}\n", vm.console_output()[-2000:]


# -- (8) calibration -----------------------------------------------------------------------

def test_calibration_gives_the_same_verdict_every_run(l1_kvm):
    from supermachine_jupyter.engines.accel import kvm_status
    verdicts = [kvm_status(refresh=True) for _ in range(5)]
    print("\n".join(v.summary() for v in verdicts))
    assert {v.speed for v in verdicts} == {"hardware"}, [v.summary() for v in verdicts]
