"""The jupyter_server extension: REST API over the VM registry, tested against a real
Jupyter server (pytest-jupyter) and real VMs; plus the packaging check that the server
extension and the labextension are enabled in this environment."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from jupyter_server.auth import Authorizer
from tornado.httpclient import HTTPClientError
from traitlets import TraitError

from supermachine_jupyter.jupyter import registry
from supermachine_jupyter.config import MountSpec, VmConfig
from supermachine_jupyter.jupyter.server import handlers

# pytest-jupyter's fixtures (jp_fetch, jp_serverapp, …), imported into this module only: as a
# plugin (pytest_plugins) its autouse fixtures would wrap every test of the session, and its
# event loop clashes with Playwright's in tests/ui. So these tests are sync and drive the
# server's loop themselves (``Api.call``).
from pytest_jupyter.jupyter_server import *  # noqa: E402,F401,F403

API = ("supermachine", "api")


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    """One private registry for this module's VMs and servers."""
    path = tmp_path_factory.mktemp("registry")
    patch = pytest.MonkeyPatch()
    patch.setenv(registry.REGISTRY_DIR_ENV, str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def vms(registry_dir, guest_image, tmp_path_factory):
    """Two VMs: ``srv-full`` (balloon, a host mount) and ``srv-plain`` (neither)."""
    from supermachine_jupyter.config import VmConfig
    share = tmp_path_factory.mktemp("share")
    (share / "hello.txt").write_text("hello from the host\n")
    full = guest_image.start(VmConfig(engine="qemu", name="srv-full", memory_mib=256,
                                      balloon=True,
                                      mounts=[MountSpec(str(share), "share", "/mnt/share")]))
    plain = guest_image.start(VmConfig(engine="qemu", name="srv-plain"))
    assert full.run("cat /mnt/share/hello.txt", timeout=30).stdout == "hello from the host\n"
    yield {"full": full, "plain": plain}
    full.stop(timeout=5)
    plain.stop(timeout=5)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"supermachine_jupyter": True}}}


class Api:
    """Sync calls to the test server's REST API (the server runs on ``loop``)."""

    def __init__(self, fetch, loop):
        self.fetch, self.loop = fetch, loop

    def call(self, *path, **kwargs):
        return self.loop.run_until_complete(self.fetch(*API, *path, **kwargs))

    def get(self, *path) -> dict:
        response = self.call(*path)
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.body)

    def post(self, *path, body: object = None) -> dict:
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body or {})
        return json.loads(self.call(*path, method="POST", body=raw).body)

    @staticmethod
    def error(call, *args, **kwargs) -> tuple[int, dict]:
        with pytest.raises(HTTPClientError) as err:
            call(*args, **kwargs)
        return err.value.code, json.loads(err.value.response.body)


@pytest.fixture
def api(jp_fetch, jp_asyncio_loop):
    return Api(jp_fetch, jp_asyncio_loop)


def test_list_shows_every_live_vm_with_its_state(api, vms):
    data = api.get("vms")
    by_name = {vm["name"]: vm for vm in data["vms"]}
    assert {"srv-full", "srv-plain"} <= set(by_name)
    full = by_name["srv-full"]
    assert full["id"] == registry.vm_id(vms["full"])
    assert (full["state"], full["engine"], full["memory_mib"]) == ("running", "qemu", 256)
    assert full["balloon"] is True and full["balloon_stats"]["target_mib"] == 0
    assert [m["tag"] for m in full["mounts"]] == ["share"]
    assert by_name["srv-plain"]["balloon_stats"] is None


def test_detail_has_config_engine_balloon_and_mount_counters(api, vms):
    vm = vms["full"]
    vm.run("cat /mnt/share/hello.txt >/dev/null", timeout=30)
    data = api.get("vms", registry.vm_id(vm))
    assert data["config"] == vm.config.to_dict()
    assert data["reason"] == vm.engine_reason and data["accel"] == vm.accel
    assert data["state"] == "running" and data["failure"] is None
    assert data["uptime_s"] >= 0
    stats = data["balloon_stats"]
    assert {"target_mib", "actual_mib", "free_memory", "total_memory"} <= set(stats)
    (mount,) = data["mounts"]
    assert mount["guest_path"] == "/mnt/share" and mount["ops"] > 0
    assert mount["bytes_read"] >= len("hello from the host\n")
    assert data["volumes"] == []


def test_balloon_sets_the_target_and_the_guest_follows(api, vms):
    vm_id = registry.vm_id(vms["full"])
    assert api.post("vms", vm_id, "balloon",
                           body={"target_mib": 64}) == {"id": vm_id, "target_mib": 64}
    deadline = time.monotonic() + 30
    while True:
        stats = (api.get("vms", vm_id))["balloon_stats"]
        if stats["actual_mib"] == 64 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (stats["target_mib"], stats["actual_mib"]) == (64, 64)
    assert stats["target_pages"] == stats["actual_pages"] == 64 * 256     # 4 KiB pages
    api.post("vms", vm_id, "balloon", body={"target_mib": 0})


def test_balloon_stats_are_in_the_documented_units(api, vms):
    """balloon.py's units (Firecracker's): guest memory in bytes, balloon in 4 KiB pages."""
    vm_id = registry.vm_id(vms["full"])
    deadline = time.monotonic() + 15
    while (stats := api.get("vms", vm_id)["balloon_stats"])["total_memory"] is None \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    mib = 2**20
    assert 128 * mib <= stats["total_memory"] <= 256 * mib, stats       # a 256 MiB VM
    assert 0 < stats["free_memory"] <= stats["total_memory"], stats
    assert 0 < stats["available_memory"] <= stats["total_memory"], stats


@pytest.mark.parametrize("body, words", [
    (b"not json", "not JSON"),
    ({}, "target_mib"),
    ({"target_mib": -1}, ">= 0"),
    ({"target_mib": "64"}, "target_mib"),
    ({"target_mib": True}, "target_mib"),
    ([64], "target_mib"),
    (b"", "target_mib"),
    (b'{"target_mib": \xff}', "not JSON"),                 # not UTF-8
    ({"target_mib": 256}, "from 0 to 255"),          # the VM refuses: it has 256 MiB
])
def test_bad_balloon_bodies_get_400_with_a_message(api, vms, body, words):
    vm_id = registry.vm_id(vms["full"])
    code, data = api.error(api.post, "vms", vm_id, "balloon", body=body)
    assert code == 400 and data["kind"] == "bad_request" and words in data["message"]


def test_bad_ids_and_paths_get_404_json(api, vms):
    for vm_id in ("nope", "000000000000", "..%2F..%2Fetc"):
        code, data = api.error(api.get, "vms", vm_id)
        assert code == 404 and data["kind"] == "not_found", vm_id
    code, data = api.error(api.post, "vms", "000000000000", "stop")
    assert code == 404
    code, data = api.error(api.get, "nothing-here")
    assert code == 404 and "no such endpoint" in data["message"]


def test_balloon_on_a_vm_without_one_is_a_conflict(api, vms):
    vm_id = registry.vm_id(vms["plain"])
    code, data = api.error(api.post, "vms", vm_id, "balloon", body={"target_mib": 16})
    assert code == 409 and data["kind"] == "no_balloon" and "--balloon" in data["message"]


def test_requests_without_a_token_are_refused(api, vms):
    vm_id = registry.vm_id(vms["plain"])
    no_auth = {"Authorization": ""}
    for path, kwargs in ((("vms",), {}),
                         (("vms", vm_id), {}),
                         (("vms", vm_id, "stop"), {"method": "POST", "body": "{}"}),
                         (("vms", vm_id, "balloon"), {"method": "POST",
                                                      "body": '{"target_mib": 1}'})):
        with pytest.raises(HTTPClientError) as err:
            api.call(*path, headers=no_auth, **kwargs)
        assert err.value.code in (401, 403), path
    code, _ = api.error(api.call, "vms", headers={"Authorization": "token wrong"})
    assert code in (401, 403)
    assert vms["plain"].state == "running"


DEEP = 100000


@pytest.mark.parametrize("body, words", [
    # 200 KB: refused for its size before anything parses it.
    (b"[" * DEEP + b"]" * DEEP, "at most"),
    # Small enough to be parsed, nested beyond the parser's recursion limit.
    (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
    (b'{"target_mib": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested too deeply"),
    (b"{" + b'"a":{' * 10000 + b"}" * 10001, "nested too deeply"),
    (b'{"target_mib": 1, "pad": "' + b"x" * handlers.MAX_BODY_BYTES + b'"}', "at most"),
])
def test_deeply_nested_or_oversized_bodies_get_400_not_500(api, vms, body, words):
    vm_id = registry.vm_id(vms["full"])
    code, data = api.error(api.post, "vms", vm_id, "balloon", body=body)
    assert code == 400 and data["kind"] == "bad_request" and words in data["message"], data
    assert len(data["message"]) < 500, "the message echoes the body"
    # The server goes on serving.
    assert api.get("vms", vm_id)["state"] == "running"


def test_a_vm_config_from_deeply_nested_json_is_a_trait_error_not_a_recursion_error():
    # The same input as above reaches VmConfig.from_json from magics and the CLI.
    with pytest.raises(TraitError, match="JSON"):
        VmConfig.from_json("[" * DEEP + "]" * DEEP)
    with pytest.raises(TraitError, match="JSON"):
        VmConfig.from_json('{"memory_mib": ' + "[" * DEEP + "]" * DEEP + "}")


class _DenyingAuthorizer(Authorizer):
    """Refuses the actions in ``denied`` on this API's resource; allows everything else
    (other resources too, so the test also checks which resource the handlers name)."""
    denied: frozenset = frozenset()

    def is_authorized(self, handler, user, action, resource):
        return not (resource == "supermachine" and action in self.denied)


class ReadOnlyAuthorizer(_DenyingAuthorizer):
    denied = frozenset({"write"})


class NoAccessAuthorizer(_DenyingAuthorizer):
    denied = frozenset({"read", "write", "execute"})


def _server_config(authorizer) -> dict:
    return {"ServerApp": {"jpserver_extensions": {"supermachine_jupyter": True},
                          "authorizer_class": authorizer}}


def _mutating_calls(vm_id: str) -> list[tuple[tuple, object]]:
    """Every POST route of the API (with bodies it would otherwise accept)."""
    return [(("vms", vm_id, "stop"), {}),
            (("vms", vm_id, "balloon"), {"target_mib": 16}),
            (("vms", "000000000000", "balloon"), {"target_mib": 16}),
            (("vms", "000000000000", "stop"), {}),
            (("nothing-here",), {})]


class TestAnAuthorizerThatAllowsOnlyReading:
    @pytest.fixture
    def jp_server_config(self):
        return _server_config(ReadOnlyAuthorizer)

    def test_every_post_is_refused_with_403_and_changes_nothing(self, api, vms):
        vm = vms["full"]
        vm_id = registry.vm_id(vm)
        target = vm.balloon_stats().target_mib
        # A GET first: jupyter_server's @authorized fixes a wrapped function's action at its
        # first call, so a handler sharing one function for GET and POST would then let
        # POSTs through as "read".
        assert api.error(api.get, "nothing-here")[0] == 404
        for path, body in _mutating_calls(vm_id):
            code, data = api.error(api.post, *path, body=body)
            assert code == 403, (path, code, data)
        assert vm.state == "running"
        assert vm.balloon_stats().target_mib == target

    def test_reads_still_work(self, api, vms):
        vm_id = registry.vm_id(vms["full"])
        assert "srv-full" in {v["name"] for v in api.get("vms")["vms"]}
        assert api.get("vms", vm_id)["state"] == "running"
        code, _ = api.error(api.get, "vms", "000000000000")
        assert code == 404                              # allowed to look, nothing there


class TestAnAuthorizerThatAllowsNothing:
    @pytest.fixture
    def jp_server_config(self):
        return _server_config(NoAccessAuthorizer)

    def test_reads_and_writes_are_refused_with_403(self, api, vms):
        vm = vms["full"]
        vm_id = registry.vm_id(vm)
        for path in (("vms",), ("vms", vm_id), ("vms", "000000000000"), ("nothing-here",)):
            code, _ = api.error(api.get, *path)
            assert code == 403, path
        for path, body in _mutating_calls(vm_id):
            code, _ = api.error(api.post, *path, body=body)
            assert code == 403, path
        assert vm.state == "running"


def test_stop_stops_the_vm_in_its_owner(api, vms):
    vm = vms["plain"]
    vm_id = registry.vm_id(vm)
    assert api.post("vms", vm_id, "stop") == {"id": vm_id, "state": "stopped"}
    assert vm.state == "stopped"
    names = [v["name"] for v in (api.get("vms"))["vms"]]
    assert "srv-plain" not in names and "srv-full" in names
    code, _ = api.error(api.get, "vms", vm_id)
    assert code == 404


def _jupyter(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "jupyter", *args], capture_output=True,
                         text=True, timeout=120)
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


def test_server_extension_and_labextension_are_enabled_after_setup():
    """What README's set-up leaves behind: both extensions enabled, no manual step."""
    servers = _jupyter("server", "extension", "list")
    assert re.search(r"supermachine_jupyter enabled", servers), servers
    assert re.search(r"supermachine_jupyter \S+ OK", servers), servers
    labs = _jupyter("labextension", "list")
    assert re.search(r"supermachine-jupyter v\S+ enabled OK", labs), (
        "the labextension is not installed: `make setup` builds it into "
        "supermachine_jupyter/labextension/ and links it into the venv\n" + labs)
