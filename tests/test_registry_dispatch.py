"""The registry's publish → list → request → withdraw round trip over its real unix sockets,
with a stand-in VM object (the registry only reads a VM's fields and calls its methods), so
it needs no VM. tests/test_registry.py runs the same path with real VMs."""

from __future__ import annotations

import json
import os
import socket

import pytest

from supermachine_jupyter.config import VmConfig
from supermachine_jupyter.devices.balloon import BalloonNotEnabled, BalloonStats
from supermachine_jupyter.errors import VmStoppedError
from supermachine_jupyter.jupyter import registry


class StandInVm:
    """What the registry reads of a Vm, and a record of what it was asked to do."""

    def __init__(self, name: str, balloon: bool = True):
        self.name, self.engine, self.accel, self.engine_reason = name, "qemu", "tcg", "unit"
        self.config = VmConfig(memory_mib=128, balloon=balloon, name=name)
        self.memory_mib, self.vcpus, self.started_at, self.boot_seconds = 128, 1, 0.0, 0.1
        self.state, self.failure, self.calls = "running", None, []

    def balloon_stats(self) -> BalloonStats:
        if not self.config.balloon:
            raise BalloonNotEnabled(self.name)
        return BalloonStats(target_pages=256, actual_pages=256, target_mib=1, actual_mib=1)

    def set_balloon_target(self, mib: int) -> None:
        if not 0 <= mib < self.memory_mib:
            raise ValueError(f"balloon size must be from 0 to {self.memory_mib - 1} MiB")
        self.calls.append(("balloon", mib))

    def mounts(self) -> list:
        return []

    def host_memory_bytes(self) -> int:
        return 96 * 1024 * 1024

    def volumes(self) -> list:
        return []

    def stop(self) -> None:
        if self.state != "running":
            raise VmStoppedError(f"VM {self.name!r} is {self.state}")
        self.calls.append(("stop",))
        self.state = "stopped"


@pytest.fixture
def published(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.REGISTRY_DIR_ENV, str(tmp_path))
    vms = []

    def publish(**kwargs) -> tuple[StandInVm, str]:
        vm = StandInVm(**kwargs)
        vm_id = registry.publish(vm)
        assert vm_id is not None
        vms.append(vm)
        return vm, vm_id

    yield publish
    for vm in vms:
        registry.withdraw(vm)


def test_a_published_vm_is_listed_and_answers_each_operation(published):
    vm, vm_id = published(name="unit1")
    (entry,) = [e for e in registry.list_vms() if e["id"] == vm_id]
    assert (entry["name"], entry["memory_mib"], entry["balloon"]) == ("unit1", 128, True)
    assert registry.request(vm_id, "state") == {"state": "running", "failure": None}
    assert registry.request(vm_id, "balloon_stats")["target_mib"] == 1
    assert registry.request(vm_id, "balloon", target_mib=64) == {"target_mib": 64}
    assert registry.request(vm_id, "describe")["balloon_stats"]["actual_pages"] == 256
    assert registry.request(vm_id, "describe")["host_memory_bytes"] == 96 * 1024 * 1024
    assert registry.request(vm_id, "stop") == {"state": "stopped"}
    assert vm.calls == [("balloon", 64), ("stop",)]


@pytest.mark.parametrize("args, kind, words", [
    ({"target_mib": "64"}, "bad_request", "integer target_mib"),
    ({"target_mib": True}, "bad_request", "integer target_mib"),
    ({"target_mib": 500}, "bad_request", "from 0 to 127 MiB"),
])
def test_bad_balloon_requests_are_refused_with_their_kind(published, args, kind, words):
    vm, vm_id = published(name="unit2")
    with pytest.raises(registry.RegistryError, match=words) as info:
        registry.request(vm_id, "balloon", **args)
    assert info.value.kind == kind and vm.calls == []


def test_what_the_vm_refuses_comes_back_with_its_kind(published):
    vm, vm_id = published(name="unit3", balloon=False)
    with pytest.raises(registry.RegistryError, match="no balloon device") as info:
        registry.request(vm_id, "balloon_stats")
    assert info.value.kind == "no_balloon"
    vm.state = "failed"
    with pytest.raises(registry.RegistryError) as info:
        registry.request(vm_id, "stop")
    assert info.value.kind == "not_running"


def test_the_control_socket_refuses_garbage_and_keeps_serving(published):
    _, vm_id = published(name="unit4")
    path = registry.get(vm_id)["socket"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for line in (b"not json\n", b"[1, 2]\n", b"[" * 50_000 + b"\n", b'{"op": "format_disk"}\n'):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(line)
            reply = json.loads(conn.makefile("rb").readline())
        assert reply["ok"] is False and reply["kind"] == "bad_request", (line[:20], reply)
    assert registry.request(vm_id, "state")["state"] == "running"


def test_a_withdrawn_vm_is_gone_and_unknown_ids_are_refused(published):
    vm, vm_id = published(name="unit5")
    registry.withdraw(vm)
    assert vm_id not in [e["id"] for e in registry.list_vms()]
    with pytest.raises(registry.VmNotFound):
        registry.request(vm_id, "state")
    with pytest.raises(registry.VmNotFound, match="12 hex digits"):
        registry.get("../../etc/passwd")
