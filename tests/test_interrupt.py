"""Interrupt through a real Jupyter kernel: ``KernelManager.interrupt_kernel`` signals the
kernel's whole process group, as JupyterLab's "interrupt kernel" button does. Named VMs (with
a balloon and a host mount, so virtiofsd runs too) must survive it, whatever cell was
interrupted; a VM that was lost anyway is never replaced silently."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
from jupyter_client import KernelManager

from tests.helpers import engine_pids


class Kernel:
    """A real IPython kernel with the extension loaded; ``run`` returns a cell's text."""

    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.run("%load_ext supermachine_jupyter")

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def run(self, code: str, timeout: float = 120, interrupt_when: str | None = None,
            allow_error: bool = False) -> str:
        """Execute ``code``; with ``interrupt_when``, interrupt the kernel as soon as that
        text has appeared in the cell's output. Returns stdout + stderr + displayed text."""
        msg_id = self.kc.execute(code)
        text, interrupted_at, deadline = "", None, time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"cell did not finish in {timeout} s; output so far:\n"
                                     f"{text}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text += content["text"]
            elif kind in ("display_data", "update_display_data", "execute_result"):
                text += content["data"].get("text/plain", "") + "\n"
            elif kind == "error":
                text += f"{content['ename']}: {content['evalue']}\n"
                if not allow_error and content["ename"] != "KeyboardInterrupt":
                    raise AssertionError(f"cell raised {content['ename']}: {content['evalue']}"
                                         f"\n{text}")
            elif kind == "status" and content["execution_state"] == "idle":
                self.interrupt_seconds = (time.monotonic() - interrupted_at
                                          if interrupted_at else None)
                return text
            if interrupt_when and interrupted_at is None and interrupt_when in text:
                interrupted_at = time.monotonic()
                self.km.interrupt_kernel()

    def child_states(self) -> dict[int, str]:
        """Direct children of the kernel process and their state letter (Z: zombie)."""
        states = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[0:2]
            except OSError:
                continue
            if int(ppid) == self.pid:
                states[int(entry)] = state
        return states

    def close(self) -> None:
        try:
            self.run("%vm stop --all", timeout=60)
        finally:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    yield k
    k.close()


@pytest.fixture(scope="module")
def demo(kernel, guest_image, tmp_path_factory):
    """A named QEMU VM with a balloon and a host mount, started in the kernel."""
    share = tmp_path_factory.mktemp("share")
    (share / "hello.txt").write_text("from the host\n")
    kernel.share = share
    out = kernel.run(f"%%vm --name demo --engine qemu --balloon --mount {share}:share:/mnt/share"
                     "\ncat /mnt/share/hello.txt")
    assert "from the host" in out, out
    return kernel


def vm_pids(kernel: Kernel) -> set[int]:
    return set(engine_pids("qemu-system", parent=kernel.pid)) | \
        set(engine_pids("virtiofsd", parent=kernel.pid))


def still_the_same_vm(kernel: Kernel, pids_before: set[int]) -> None:
    out = kernel.run("%%vm --name demo\necho alive; cat /mnt/share/hello.txt")
    assert "alive" in out and "from the host" in out, out
    assert "lost" not in out, out
    assert vm_pids(kernel) == pids_before, "the VM's engine processes changed"
    out = kernel.run("vm = get_ipython()._supermachine_magics.vms['demo']\n"
                     "vm.set_balloon_target(16); print('balloon', vm.balloon_stats().target_mib)")
    assert "balloon 16" in out, out
    assert "Z" not in kernel.child_states().values(), "a zombie child of the kernel"


def test_engine_processes_run_outside_the_kernels_process_group(demo):
    kernel_group = os.getpgid(demo.pid)
    pids = vm_pids(demo)
    assert len(pids) >= 2, f"expected QEMU and virtiofsd, found {pids}"
    for pid in pids:
        assert os.getpgid(pid) != kernel_group, f"engine process {pid} is in the kernel's group"


def test_interrupting_a_vm_cell_stops_the_command_and_keeps_the_vm(demo):
    before = vm_pids(demo)
    out = demo.run("%%vm --name demo\necho started; sleep 30; echo never", timeout=60,
                   interrupt_when="started")
    assert "never" not in out and "interrupted" in out, out
    assert "VM demo kept" in out, out
    assert demo.interrupt_seconds < 5, f"interrupt took {demo.interrupt_seconds:.1f} s"
    still_the_same_vm(demo, before)


def test_interrupting_a_plain_bash_cell_keeps_the_vm(demo):
    before = vm_pids(demo)
    demo.run("%%bash\necho started; sleep 30", timeout=60, interrupt_when="started",
             allow_error=True)
    demo.run("import time\nprint('started', flush=True); time.sleep(30)", timeout=60,
             interrupt_when="started", allow_error=True)
    still_the_same_vm(demo, before)


def test_interrupt_escalates_to_sigkill_for_a_command_that_ignores_int_and_term(demo):
    out = demo.run("%%vm --name demo\ntrap '' INT TERM; echo started; sleep 30; echo never",
                   timeout=60, interrupt_when="started")
    assert "never" not in out, out
    assert "killed by SIGKILL" in out, out


def test_a_lost_named_vm_is_reported_and_restarted_with_its_config(demo):
    qemu = engine_pids("qemu-system", parent=demo.pid)
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    # Until it has exited: a zombie with no thread left, or reaped. (A process tearing down
    # its memory has no command line any more, and the leader of a multi-threaded one shows
    # "Z" while its other threads are still exiting: neither has ended yet.)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{qemu[0]}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            if zombie and len(os.listdir(f"/proc/{qemu[0]}/task")) <= 1:
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    out = demo.run("%%vm --name demo\necho back; cat /mnt/share/hello.txt; "
                   "test -e /sys/bus/virtio/drivers/virtio_balloon/virtio* && echo balloon-on")
    assert "was lost" in out and "killed by signal 9" in out, out
    assert "started again with its original config" in out, out
    assert "back" in out and "from the host" in out and "balloon-on" in out, out
    assert "⚠" in out and "exit 0" in out, out


def test_native_vm_survives_interrupts(kernel):
    from supermachine_jupyter.engines import native
    ok, why = native.available()
    if not ok:
        pytest.skip(f"the native core cannot run here: {why}")
    probe = str(native.probe_path("agent"))   # Linux needs a real KVM: the agent probe guest
    kernel.run("from supermachine_jupyter import VmConfig\n"
               f"probe_config = VmConfig(engine='native', memory_mib=64).with_assets({probe!r}, "
               f"{probe!r})")
    out = kernel.run("%%vm --config probe_config --name nat\ncount")
    assert "1\n" in out, out
    kernel.run("%%bash\necho started; sleep 30", timeout=60, interrupt_when="started",
               allow_error=True)
    kernel.run("import time\nprint('started', flush=True); time.sleep(30)", timeout=60,
               interrupt_when="started", allow_error=True)
    out = kernel.run("%%vm --name nat\ncount")   # the counter lives in guest RAM: same VM
    assert "2\n" in out and "lost" not in out, out
    kernel.run("%vm stop nat")


def test_bad_options_are_one_line_usage_errors(kernel):
    kernel.run("notconfig = 5")
    for line, expected in (("--memory 1", "memory_mib"), ("--timeout -1", "--timeout"),
                           ("--timeout nan", "--timeout"), ("--config notconfig", "not a VmConfig"),
                           ("--config nothing", "no variable of that name"),
                           ("--volume /nonexistent-dir/v.img:/data", "directory does not exist"),
                           ("--volume /tmp/v.img:/my,data", "guest_path"),
                           ("--snapshot ../x", "snapshot name")):
        out = kernel.run(f"%%vm {line}\ntrue", allow_error=True, timeout=30)
        assert out.startswith("UsageError: ") and expected in out, (line, out)
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, (line, out)
    out = kernel.run("%vm stop nosuchvm", allow_error=True, timeout=30)
    assert out.startswith("UsageError: no VM named 'nosuchvm'"), out
