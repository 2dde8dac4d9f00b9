"""%%vm and %vm through a real IPython shell and real VMs (QEMU here)."""

import os
import shutil
import signal
import sys
import threading
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.core.error import UsageError

from supermachine_jupyter import snapshots
from supermachine_jupyter.snapshots import cache
from supermachine_jupyter.jupyter.magics import VmCommandError
from tests.helpers import engine_pids


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    yield shell
    shell.run_line_magic("vm", "stop --all")


def run_cell(ip, capsys, line, cell):
    ip.run_cell_magic("vm", line, cell)
    return capsys.readouterr()


@pytest.fixture
def m1(ip):
    """The named VM ``m1`` the tests of this module share (one boot for all of them): started
    by whichever test asks first, so each test also passes alone, in any order."""
    ip.run_cell_magic("vm", "--name m1 --quiet", "true")
    assert ip._supermachine_magics.vms["m1"].state == "running"
    return "m1"


def test_output_streams_in_order_with_status(ip, capsys):
    out = run_cell(ip, capsys, "--name m1", "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2")
    lines = [l for l in out.out.splitlines() if l.startswith("line")]
    assert lines == [f"line{i}" for i in range(1, 6)]
    assert "oops" in out.err and "oops" not in out.out
    assert "[m1 · qemu/" in out.out and "exit 0" in out.out


def test_output_arrives_while_the_command_runs(ip, capsys):
    seen = []
    real_write = sys.stdout.write

    def stamped(text):
        seen.append((time.monotonic(), text))
        return real_write(text)

    sys.stdout.write = stamped
    try:
        ip.run_cell_magic("vm", "--name m1 --quiet", "echo first; sleep 1.5; echo second")
    finally:
        sys.stdout.write = real_write
    times = {t.strip(): ts for ts, t in seen if t.strip() in ("first", "second")}
    assert times["second"] - times["first"] > 1.0   # "first" was shown before the sleep ended


def test_named_vm_keeps_files_between_cells(ip, capsys):
    run_cell(ip, capsys, "--name m1", "echo persisted > /root/note")
    out = run_cell(ip, capsys, "--name m1", "cat /root/note")
    assert "persisted" in out.out


def test_exit_status_shown_and_raise(ip, capsys):
    out = run_cell(ip, capsys, "--name m1", "exit 3")
    assert "exit 3" in out.out
    with pytest.raises(VmCommandError, match="exit status 3"):
        ip.run_cell_magic("vm", "--name m1 --raise --quiet", "exit 3")
    assert ip._supermachine_magics.last_result.exit_code == 3


def test_interrupt_returns_fast_and_vm_survives(ip, capsys):
    def interrupt():
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    started = time.monotonic()
    run_cell(ip, capsys, "--name m1", "echo go; sleep 60")
    elapsed = time.monotonic() - started - 1.5
    assert elapsed < 3.0, f"interrupt took {elapsed:.2f} s"
    result = ip._supermachine_magics.last_result
    assert result.signal == signal.SIGINT
    out = run_cell(ip, capsys, "--name m1", "echo still-here")
    assert "still-here" in out.out


def test_timeout_kills_command_and_vm_survives(ip, capsys):
    out = run_cell(ip, capsys, "--name m1 --timeout 1", "sleep 30")
    assert "timed out" in out.out
    assert ip._supermachine_magics.last_result.timed_out
    assert "ok" in run_cell(ip, capsys, "--name m1 --quiet", "echo ok").out


def test_list_console_config(ip, capsys, m1):
    table = ip.run_line_magic("vm", "list")
    assert "m1" in repr(table) and "running" in repr(table)
    ip.run_line_magic("vm", "console m1")
    console = capsys.readouterr().out
    # A booted VM shows its init; one restored from the pre-booted snapshot says so.
    assert "supermachine-init: ready" in console or "restored from snapshot" in console
    config = ip.run_line_magic("vm", "config m1")
    assert config.name == "m1"


def test_config_variable_and_flags(ip, capsys):
    from supermachine_jupyter import VmConfig
    ip.user_ns["small"] = VmConfig(memory_mib=128)
    out = run_cell(ip, capsys, "--config small --vcpus 2", "nproc; grep MemTotal /proc/meminfo")
    assert out.out.splitlines()[1].strip() == "2" or "\n2\n" in out.out
    memtotal_kib = int(out.out.split("MemTotal:")[1].split()[0])
    assert 90_000 < memtotal_kib <= 131_072


def test_bad_arguments_name_the_field(ip):
    # UsageError: IPython shows it as one line, with no traceback.
    with pytest.raises(UsageError, match="memory_mib"):
        ip.run_cell_magic("vm", "--memory 1", "true")
    with pytest.raises(UsageError, match="vcpus"):
        ip.run_cell_magic("vm", "--vcpus 0", "true")
    with pytest.raises(UsageError, match="--config nope: no variable of that name"):
        ip.run_cell_magic("vm", "--config nope", "true")
    ip.user_ns["not_a_config"] = [1, 2]
    with pytest.raises(UsageError, match="--config not_a_config: that variable is a list, "
                                         "not a VmConfig"):
        ip.run_cell_magic("vm", "--config not_a_config", "true")
    with pytest.raises(UsageError, match="--volume"):
        ip.run_cell_magic("vm", "--volume nonsense", "true")
    for bad in ("-1", "0", "nan", "inf"):
        with pytest.raises(UsageError, match="--timeout must be a number of seconds greater "
                                             "than 0"):
            ip.run_cell_magic("vm", f"--timeout {bad}", "true")
    with pytest.raises(UsageError, match="unknown %vm command 'frobnicate'"):
        ip.run_line_magic("vm", "frobnicate")
    with pytest.raises(UsageError, match="no VM named 'ghost'"):
        ip.run_line_magic("vm", "console ghost")


def test_unnamed_vm_is_stopped_after_the_cell(ip, capsys):
    before = set(engine_pids(parent=os.getpid()))
    run_cell(ip, capsys, "", "echo transient")
    assert set(engine_pids(parent=os.getpid())) - before == set()


def test_snapshot_and_from(ip, capsys):
    run_cell(ip, capsys, "--name s1 --quiet --snapshot snap-test", "echo kept > /root/state")
    out = run_cell(ip, capsys, "--name s2 --from snap-test", "cat /root/state; hostname")
    assert "kept" in out.out and "s2" in out.out
    ip.run_line_magic("vm", "snapshots")
    assert "snap-test" in capsys.readouterr().out
    ip.run_line_magic("vm", "stop s1 s2")
    shutil.rmtree(snapshots.named_snapshot_path("snap-test"))


def test_second_unnamed_cell_restores_from_the_prebooted_snapshot(ip, capsys):
    run_cell(ip, capsys, "--quiet", "true")        # makes the pre-booted snapshot if missing
    cache.wait_for_background(timeout=60)
    out = run_cell(ip, capsys, "", "echo restored")
    assert ip._supermachine_magics.last_result.stdout == "restored\n"
    assert " · restore 0." in out.out      # the status line: restored in well under a second


def test_stop_all_leaves_no_engine_process(ip, capsys):
    run_cell(ip, capsys, "--name m2 --quiet", "true")
    assert ip._supermachine_magics.vms["m2"].instance.process_ids()
    pids = [p for vm in ip._supermachine_magics.vms.values() for p in vm.instance.process_ids()]
    ip.run_line_magic("vm", "stop --all")
    assert ip._supermachine_magics.vms == {}
    time.sleep(0.2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
