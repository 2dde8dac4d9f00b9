"""%%vm and %vm through a real IPython shell and real VMs (QEMU here)."""

import os
import re
import shutil
import signal
import sys
import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from supermachine_jupyter import snapshots
from supermachine_jupyter.jupyter.magics import VmCommandError
from supermachine_jupyter.snapshots import cache
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
    assert "✓ m1: exit 0 after " in out.out
    status = [l for l in out.out.splitlines() if l.startswith("✓ m1")]
    # Short and plain: no engine jargon, no paths (%vm info has them).
    assert len(status) == 1 and "qemu" not in status[0] and "/" not in status[0]


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
    # The status line says it restored (a boot says "booted"); how fast depends on the
    # machine's load (0.15 s idle here, over 1 s with other VMs on the 2 cores).
    restored = re.search(r" · VM restored in (\d+\.\d+) s", out.out)
    assert restored and float(restored[1]) < 5, out.out
    assert "/" not in out.out.replace("1 vCPU", "")   # no cache path on the progress line


def test_stop_all_leaves_no_engine_process(ip, capsys):
    run_cell(ip, capsys, "--name m2 --quiet", "true")
    assert ip._supermachine_magics.vms["m2"].instance.process_ids()
    pids = [p for vm in ip._supermachine_magics.vms.values() for p in vm.instance.process_ids()]
    ip.run_line_magic("vm", "stop --all")
    assert ip._supermachine_magics.vms == {}
    time.sleep(0.2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


# -- help ---------------------------------------------------------------------------------------

def _help(ip, capsys, text):
    """What ``text`` (``%%vm?`` or ``%vm?``) shows, through IPython's own inspector."""
    ip.run_cell(text)
    return capsys.readouterr().out


def test_cell_magic_help_shows_cell_usage_and_examples(ip, capsys):
    shown = _help(ip, capsys, "%%vm?")
    assert "%%vm [--name NAME]" in shown and "%vm [" not in shown.replace("%%vm [", "")
    for option in ("--out VAR", "--err VAR", "--bg", "--panel", "--verbose", "--timeout"):
        assert option in shown, option
    assert "examples:" in shown and "%%vm --bg --out log" in shown
    assert "{mib}" in shown and "variable expansion" in shown       # {var} is documented
    assert "256 MiB and 1 vCPU" in shown


def test_line_magic_help_lists_each_command_with_examples(ip, capsys):
    shown = _help(ip, capsys, "%vm?")
    for command in ("list", "info", "stop", "jobs", "console", "config", "panel", "snapshots"):
        assert f"%vm {command}" in shown, command
    assert "Examples:" in shown and "%vm stop --all" in shown
    ip.run_line_magic("vm", "help")
    assert "%vm info [NAME]" in capsys.readouterr().out


# -- --out / --err / --bg -----------------------------------------------------------------------

def test_out_and_err_capture_into_variables_not_the_cell(ip, capsys, m1):
    out = run_cell(ip, capsys, "--name m1 --out listing --err problems",
                   "echo one; echo two; echo bad >&2; exit 2")
    assert ip.user_ns["listing"] == "one\ntwo\n" and ip.user_ns["problems"] == "bad\n"
    assert "one" not in out.out and "bad" not in out.err
    assert "✗ m1: exit 2 after" in out.out           # the status line still says how it ended
    # Only one stream captured: the other is shown as usual.
    out = run_cell(ip, capsys, "--name m1 --quiet --err only_err", "echo shown; echo hidden >&2")
    assert "shown" in out.out and "hidden" not in out.err and ip.user_ns["only_err"] == "hidden\n"


def test_options_expand_notebook_variables(ip, capsys, m1):
    ip.user_ns["target"] = "expanded_var"
    ip.run_cell("%%vm --name m1 --quiet --out {target}\necho via-expansion\n")
    assert ip.user_ns["expanded_var"] == "via-expansion\n"


def test_out_and_err_refuse_bad_variable_names(ip):
    with pytest.raises(UsageError, match="--out '1x': expected a Python variable name"):
        ip.run_cell_magic("vm", "--out 1x", "true")
    with pytest.raises(UsageError, match="name the same variable"):
        ip.run_cell_magic("vm", "--out same --err same", "true")
    with pytest.raises(UsageError, match="--raise cannot be used with --bg"):
        ip.run_cell_magic("vm", "--bg --raise", "true")


def test_bg_returns_at_once_and_fills_the_variable_as_output_arrives(ip, capsys):
    from tests.helpers import wait_for
    magics = ip._supermachine_magics
    started = time.monotonic()
    run_cell(ip, capsys, "--bg --out bg_log --err bg_err",
             "echo first; sleep 3; echo second; echo warn >&2")
    job = magics.jobs[-1]
    # Returned before the command ended: the VM is started, the command still runs.
    assert not job.done and time.monotonic() - started < 2.5 + magics._last_vm.boot_seconds
    name = job.vm_name
    assert name in magics.vms, "an unnamed VM is kept (and listed) while its command runs"
    pids = magics.vms[name].instance.process_ids()
    assert pids
    assert wait_for(lambda: ip.user_ns["bg_log"] == "first\n", timeout=10)
    assert not job.done and "second" not in ip.user_ns["bg_log"]
    ip.run_line_magic("vm", "jobs")
    assert "running for" in repr(ip.run_line_magic("vm", "jobs"))
    result = job.wait(30)
    assert result is not None and result.exit_code == 0
    assert ip.user_ns["bg_log"] == "first\nsecond\n" and ip.user_ns["bg_err"] == "warn\n"
    assert "exit 0 after" in repr(ip.run_line_magic("vm", "jobs"))
    assert wait_for(lambda: name not in magics.vms, timeout=10)   # stopped once it ended
    assert wait_for(lambda: not [p for p in pids if os.path.exists(f"/proc/{p}")], timeout=10)


def test_stop_ends_a_background_cell_and_its_vm(ip, capsys):
    from tests.helpers import wait_for
    magics = ip._supermachine_magics
    before = set(engine_pids(parent=os.getpid()))
    run_cell(ip, capsys, "--bg --quiet --out never_done", "echo up; sleep 600")
    job = magics.jobs[-1]
    assert wait_for(lambda: ip.user_ns["never_done"] == "up\n", timeout=10)
    ip.run_line_magic("vm", f"stop {job.vm_name}")
    assert job.wait(10) is None and job.done and job.error      # ended, and says why
    assert job.vm_name not in magics.vms
    assert wait_for(lambda: set(engine_pids(parent=os.getpid())) - before == set(), timeout=10)


def test_bg_in_a_named_vm_keeps_it(ip, capsys, m1):
    run_cell(ip, capsys, "--name m1 --bg --quiet --out named_bg", "sleep 1; echo done")
    job = ip._supermachine_magics.jobs[-1]
    assert job.wait(30).exit_code == 0 and ip.user_ns["named_bg"] == "done\n"
    assert ip._supermachine_magics.vms["m1"].state == "running"


# -- --panel, status, info ----------------------------------------------------------------------

def test_panel_of_an_unnamed_vm_follows_the_run_then_says_it_ended(ip, capsys):
    magics = ip._supermachine_magics
    seen_running = []

    def watch():
        # The dashboard is shown before the command runs: it sees the VM running.
        from tests.helpers import wait_for
        panel = wait_for(lambda: magics.last_panel if magics.last_panel is not None
                         and magics.last_panel is not previous else None, timeout=30)
        if panel is not None and wait_for(lambda: "running" in panel.state_line.value, 10):
            seen_running.append(panel.state_line.value)

    previous = magics.last_panel
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_cell(ip, capsys, "--panel", "sleep 2; echo watched")
    watcher.join(30)
    panel = magics.last_panel
    assert panel is not previous and seen_running, "the panel never showed the VM running"
    assert panel.vm.state == "stopped"
    assert "ended with its cell" in panel.progress.value and "--name" in panel.progress.value
    panel.close()


def test_verbose_and_info_give_the_engine_details(ip, capsys, m1):
    out = run_cell(ip, capsys, "--name m1 --verbose", "true")
    vm = ip._supermachine_magics.vms["m1"]
    assert f"{vm.engine}/{vm.accel} ({vm.engine_reason})" in out.out
    info = repr(ip.run_line_magic("vm", "info m1"))
    assert vm.engine_reason in info and "256 MiB, 1 vCPU" in info and "started" in info
    run_cell(ip, capsys, "--quiet", "true")
    last = repr(ip.run_line_magic("vm", "info"))       # no name: the last cell's VM
    assert "state    stopped" in last


def test_mounts_show_host_and_guest_paths_in_info(ip, capsys, tmp_path):
    (tmp_path / "hello.txt").write_text("hi from the host")
    run_cell(ip, capsys, f"--name m3 --quiet --mount {tmp_path}:share:/mnt/share:ro",
             "cat /mnt/share/hello.txt")
    info = repr(ip.run_line_magic("vm", "info m3"))
    assert f"{tmp_path} → /mnt/share (tag share, read-only)" in info
    ip.run_line_magic("vm", "stop m3")


def test_no_status_line_says_exit_none(ip, capsys, m1):
    out = run_cell(ip, capsys, "--name m1 --timeout 1", "sleep 30")
    assert "timed out, command killed" in out.out and "None" not in out.out


def test_marks_are_in_dejavu():
    """The progress and status marks render in Chromium's default fonts on Debian (DejaVu):
    an emoji such as ⏳ shows as an empty box there."""
    import subprocess

    from supermachine_jupyter.widgets import format as fmt
    fonts = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
             "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"]
    if not shutil.which("fc-query") or not all(os.path.exists(f) for f in fonts):
        pytest.skip("needs fc-query and fonts-dejavu-core (apt-get install fontconfig "
                    "fonts-dejavu-core)")
    for font in fonts:
        charset = subprocess.run(["fc-query", "--format=%{charset}", font],
                                 capture_output=True, text=True, check=True).stdout.split()
        ranges = [tuple(int(x, 16) for x in (part.split("-") * 2)[:2]) for part in charset]
        for mark in (fmt.PROGRESS_MARK, fmt.OK_MARK, fmt.FAILED_MARK, fmt.WARNING_MARK):
            assert any(lo <= ord(mark) <= hi for lo, hi in ranges), (mark, font)
        assert not any(lo <= 0x23F3 <= hi for lo, hi in ranges)    # the test can fail
