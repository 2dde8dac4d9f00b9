"""The runtime registry of live VMs (``registry.py``): real VMs publish themselves, other
code lists them and controls them over their control sockets, and entries of owners that
died (SIGKILL, pid reused, socket gone) disappear when the registry is read."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from supermachine_jupyter.jupyter import registry
from supermachine_jupyter.jupyter.registry import RegistryError, VmNotFound


@pytest.fixture(autouse=True)
def registry_dir(tmp_path, monkeypatch):
    """A private registry for each test (the real one may list other people's VMs)."""
    path = tmp_path / "registry"
    monkeypatch.setenv(registry.REGISTRY_DIR_ENV, str(path))
    return path


def _ids() -> set[str]:
    return {entry["id"] for entry in registry.list_vms()}


def _start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (starttime, clock ticks after boot), parsed here rather
    than by the code under test."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[22 - 3])


def test_a_vm_publishes_itself_and_answers_requests(start_vm, registry_dir):
    vm = start_vm(balloon=True, memory_mib=256, name="reg-a")
    vm_id = registry.vm_id(vm)
    assert vm_id is not None and registry.ID_RE.fullmatch(vm_id)

    entry = registry.get(vm_id)
    assert vm_id in _ids()
    assert entry["name"] == "reg-a"
    assert entry["pid"] == os.getpid()
    assert entry["pid_start"] == _start_ticks(os.getpid())   # what tells a reused pid apart
    assert (entry["engine"], entry["accel"]) == (vm.engine, vm.accel)
    assert entry["reason"] == vm.engine_reason
    assert entry["config"] == vm.config.to_dict()
    assert (entry["memory_mib"], entry["vcpus"]) == (256, vm.vcpus)
    assert entry["started_at"] == pytest.approx(vm.started_at)
    assert entry["kernel_id"] is None          # not an ipykernel

    json_path = registry_dir / f"{vm_id}.json"
    assert stat.S_IMODE(json_path.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(entry["socket"]).st_mode)
    assert not [p for p in registry_dir.iterdir() if p.name.startswith(".")], "temp files left"

    assert registry.request(vm_id, "state") == {"state": "running", "failure": None}
    assert registry.request(vm_id, "mounts") == {"mounts": [], "volumes": []}
    assert registry.request(vm_id, "balloon", target_mib=64) == {"target_mib": 64}
    deadline = time.monotonic() + 30
    while True:
        stats = registry.request(vm_id, "balloon_stats")
        if stats["actual_mib"] == 64 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert stats["target_mib"] == 64 and stats["actual_mib"] == 64
    described = registry.describe(vm_id)
    assert described["state"] == "running" and described["balloon_stats"]["target_mib"] == 64

    # Stopping through the registry stops the VM in its owner and withdraws the entry.
    assert registry.request(vm_id, "stop") == {"state": "stopped"}
    assert vm.state == "stopped"
    assert vm_id not in _ids()
    assert not json_path.exists() and not os.path.exists(entry["socket"])
    with pytest.raises(VmNotFound):
        registry.request(vm_id, "state")


def test_a_vm_is_listed_as_booting_from_its_launch_and_keeps_its_id(guest_image):
    """The sidebar shows a VM while it boots: the launcher lists it before the guest
    answers, and the running VM takes the same entry over."""
    import threading

    from supermachine_jupyter.config import VmConfig
    started: dict = {}
    booting_seen: list[dict] = []
    thread = threading.Thread(target=lambda: started.setdefault(
        "vm", guest_image.start(VmConfig(engine="qemu", name="reg-boot", memory_mib=192),
                                snapshot_cache=False)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not booting_seen and "vm" not in started and time.monotonic() < deadline:
            for entry in registry.list_vms():
                if entry["name"] == "reg-boot" and entry["booting"]:
                    booting_seen.append({**entry, **registry.describe(entry["id"])})
            time.sleep(0.02)
        assert booting_seen, "the VM was never listed while it booted"
        booting = booting_seen[0]
        assert booting["state"] == "booting" and booting["engine"] == ""
        assert (booting["memory_mib"], booting["vcpus"]) == (192, 1)
        assert booting["host_memory_bytes"] is None and booting["balloon_stats"] is None
        with pytest.raises(RegistryError) as err:
            registry.request(booting["id"], "stop")
        assert err.value.kind == "not_running" and "still booting" in str(err.value)

        thread.join(60)
        vm = started["vm"]
        assert registry.vm_id(vm) == booting["id"]        # the same card, now running
        running = registry.describe(booting["id"])
        assert running["state"] == "running" and not running["booting"]
        assert running["engine"] == vm.engine and running["boot_seconds"] > 0
        assert running["host_memory_bytes"] == pytest.approx(vm.host_memory_bytes(), rel=0.5)
        assert [e["id"] for e in registry.list_vms()] == [booting["id"]]
    finally:
        thread.join(60)
        if "vm" in started:
            started["vm"].stop()
    assert registry.list_vms() == []


def test_a_failed_boot_withdraws_its_booting_entry(guest_image, tmp_path):
    from supermachine_jupyter.config import AssetPaths, VmConfig
    from supermachine_jupyter.errors import VmError
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\0" * 4096)
    config = VmConfig(engine="qemu", name="reg-fail",
                      assets=AssetPaths(str(kernel), str(guest_image.initrd)))
    with pytest.raises(VmError):
        guest_image.start(config, boot_timeout=20, snapshot_cache=False)
    assert registry.list_vms() == []


def test_requests_that_cannot_be_served_say_why(start_vm):
    vm = start_vm(name="reg-b")           # no balloon
    vm_id = registry.vm_id(vm)
    with pytest.raises(RegistryError) as err:
        registry.request(vm_id, "balloon_stats")
    assert err.value.kind == "no_balloon" and "--balloon" in str(err.value)
    with pytest.raises(RegistryError) as err:
        registry.request(vm_id, "balloon", target_mib="lots")
    assert err.value.kind == "bad_request"
    with pytest.raises(RegistryError) as err:
        registry.request(vm_id, "reboot")
    assert err.value.kind == "bad_request"
    for bad_id in ("../../etc/passwd", "ABCDEF123456", "", "0" * 12):
        with pytest.raises(VmNotFound):
            registry.get(bad_id)
    # A malformed request line gets an error reply, and the server goes on serving.
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(registry.get(vm_id)["socket"])
        conn.sendall(b"{not json\n")
        reply = json.loads(conn.makefile().readline())
    assert reply["ok"] is False and reply["kind"] == "bad_request"
    # So does JSON nested beyond the parser's recursion limit (within the size bound).
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(registry.get(vm_id)["socket"])
        conn.sendall(b"[" * 30000 + b"]" * 30000 + b"\n")
        reply = json.loads(conn.makefile().readline())
    assert reply["ok"] is False and reply["kind"] == "bad_request", reply
    assert "nested" in reply["error"]
    assert registry.request(vm_id, "state")["state"] == "running"

    vm.stop()                 # withdrawn by the VM itself, not by a reader
    assert vm_id not in _ids()


def test_a_balloon_target_the_vm_refuses_is_a_bad_request(start_vm):
    vm = start_vm(name="reg-c", balloon=True, memory_mib=128)
    vm_id = registry.vm_id(vm)
    with pytest.raises(RegistryError) as err:
        registry.request(vm_id, "balloon", target_mib=128)
    assert err.value.kind == "bad_request" and "128" in str(err.value)
    vm.stop()


CHILD = textwrap.dedent("""
    import sys, time
    from supermachine_jupyter import Image, VmConfig
    from supermachine_jupyter.jupyter import registry
    vm = Image.default().start(VmConfig(engine="qemu", name="orphan"))
    print(registry.vm_id(vm), flush=True)
    time.sleep(600)
""")


def test_entries_of_a_killed_owner_disappear_on_read(guest_image, registry_dir):
    env = {**os.environ, registry.REGISTRY_DIR_ENV: str(registry_dir),
           "JPY_SESSION_NAME": "analysis.ipynb"}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        vm_id = child.stdout.readline().strip()
        assert registry.ID_RE.fullmatch(vm_id), f"child said {vm_id!r}"
        entry = registry.get(vm_id)
        assert entry["pid"] == child.pid and entry["notebook"] == "analysis.ipynb"
        assert registry.request(vm_id, "state")["state"] == "running"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    # SIGKILL: no atexit, no withdraw. The files stay until someone reads the registry.
    assert (registry_dir / f"{vm_id}.json").exists()
    assert vm_id not in _ids()
    assert not (registry_dir / f"{vm_id}.json").exists()
    assert not os.path.exists(entry["socket"])
    with pytest.raises(VmNotFound):
        registry.get(vm_id)


def _fake_entry(registry_dir, vm_id: str, **fields) -> None:
    registry_dir.mkdir(parents=True, exist_ok=True)
    entry = {"id": vm_id, "name": "fake", "pid": os.getpid(),
             "pid_start": registry._process_start_ticks(os.getpid()),
             "socket": str(registry_dir / f"{vm_id}.sock"), "started_at": time.time(), **fields}
    (registry_dir / f"{vm_id}.json").write_text(json.dumps(entry))


def test_entries_whose_socket_refuses_or_whose_pid_was_reused_disappear(registry_dir):
    # A live pid but nobody listening on the socket (the owner closed it).
    _fake_entry(registry_dir, "aaaaaaaaaaaa")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(registry_dir / "aaaaaaaaaaaa.sock"))
    dead.close()
    # A live pid that belongs to another process now (start time differs).
    _fake_entry(registry_dir, "bbbbbbbbbbbb", pid_start=1)
    # A pid that no longer exists.
    _fake_entry(registry_dir, "cccccccccccc", pid=2**22 + 12345, pid_start=None)
    # Garbage, and the temp file of a writer that died before its rename.
    (registry_dir / "dddddddddddd.json").write_text("{truncated")
    (registry_dir / "ffffffffffff.json").write_text("[" * 100000 + "]" * 100000)
    (registry_dir / f".eeeeeeeeeeee.json.tmp-{2**22 + 12345}-1").write_text("{")

    assert registry.list_vms() == []
    assert sorted(p.name for p in registry_dir.iterdir()) == []


def test_an_unwritable_registry_does_not_stop_a_vm_from_starting(start_vm, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(registry.REGISTRY_DIR_ENV, str(blocker / "registry"))
    vm = start_vm(name="reg-d")
    assert vm.state == "running" and registry.vm_id(vm) is None
    vm.stop()


def test_a_registry_too_deep_for_a_socket_path_still_works(start_vm, monkeypatch, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "registry"
    monkeypatch.setenv(registry.REGISTRY_DIR_ENV, str(deep))
    vm = start_vm(name="reg-e")
    entry = registry.get(registry.vm_id(vm))
    assert not entry["socket"].startswith(str(deep)) and len(entry["socket"]) <= 100
    assert registry.request(entry["id"], "state")["state"] == "running"
    vm.stop()
    assert not os.path.exists(entry["socket"]) and registry.list_vms() == []


def _listen(path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    return listener


def test_an_entry_whose_pid_now_belongs_to_another_process_is_stale_despite_a_live_socket(
        registry_dir):
    """The pid is alive and the socket accepts connections, but the process holding the pid
    started at another time than the one recorded: the owner died and its pid was reused.
    Only the start time (field 22 of /proc/<pid>/stat) tells, and the entry must go."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    registry_dir.mkdir(parents=True, exist_ok=True)
    listeners = [_listen(registry_dir / f"{c * 12}.sock") for c in "ab"]
    try:
        start = _start_ticks(other.pid)
        _fake_entry(registry_dir, "a" * 12, pid=other.pid, pid_start=start)
        _fake_entry(registry_dir, "b" * 12, pid=other.pid, pid_start=start - 1)

        assert _ids() == {"a" * 12}                    # same pid, same start: live
        assert not (registry_dir / f"{'b' * 12}.json").exists()
        assert not (registry_dir / f"{'b' * 12}.sock").exists()
        with pytest.raises(VmNotFound):
            registry.get("b" * 12)
        with pytest.raises(VmNotFound):
            registry.request("b" * 12, "state", timeout=2)
        assert registry.get("a" * 12)["pid"] == other.pid
    finally:
        for listener in listeners:
            listener.close()
        other.kill()
        other.wait()
