"""REST handlers under ``<base_url>/supermachine/api/``.

==========================  ===============================================================
``GET  vms``                ``{"vms": [VM…]}``: every live VM, with its live state, from
                            the moment it starts booting (state ``booting``)
``GET  vms/<id>``           one VM: entry (config, engine, owner: ``kernel_id``, ``notebook``),
                            state, balloon stats, mounts with counters, volumes, and
                            ``host_memory_bytes`` (what it holds resident on the host)
``POST vms/<id>/stop``      stop it; answers once it has stopped: ``{"id", "state"}``
``POST vms/<id>/balloon``   body ``{"target_mib": n}``: set the balloon size
==========================  ===============================================================

Every handler uses the server's own authentication (token or cookie; 403 without), its
authorizer (resource ``supermachine``: GET needs ``read``, POST ``write``; 403 when refused) and
its XSRF rule for browser POSTs. Errors are JSON ``{"message", "kind"}`` with 400 (bad body:
not JSON, nested too deeply, or over ``MAX_BODY_BYTES``), 404 (no such VM), 409 (no balloon /
not running, or still booting), 504 (owner did not answer) or 500.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Callable

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import registry

API_PREFIX = "supermachine/api"
#: The authorization resource name (for jupyter_server's Authorizer).
AUTH_RESOURCE = "supermachine"
STATUS_BY_KIND = {"not_found": 404, "bad_request": 400, "no_balloon": 409,
                  "not_running": 409, "timeout": 504, "internal": 500}
VM_ID = r"(?P<vm_id>[^/]+)"
#: Request bodies are small JSON objects; anything larger is refused unparsed.
MAX_BODY_BYTES = 64 * 1024


class _BadBody(ValueError):
    """A request body that is not acceptable JSON (the message says why)."""


class _BaseHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a (blocking) registry call off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    def _fail(self, status: int, message: str, kind: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, "kind": kind}))

    def _fail_registry(self, exc: registry.RegistryError) -> None:
        self._fail(STATUS_BY_KIND.get(exc.kind, 500), str(exc), exc.kind)

    def _json_body(self) -> Any:
        """The request body parsed as JSON (``None`` when empty); :class:`_BadBody` if it is
        too large, not JSON, or nested too deeply for the parser (a ``[[[[…]]]]`` body must
        be a 400, not a RecursionError and a 500)."""
        raw = self.request.body or b""
        if len(raw) > MAX_BODY_BYTES:
            raise _BadBody(f"the body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except RecursionError:
            raise _BadBody("the body is not JSON this API accepts: it is nested too "
                           "deeply") from None
        except ValueError as exc:                # includes bad UTF-8
            raise _BadBody(f"the body is not JSON: {exc}") from None

    def _ok(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))


def _describe_all() -> list[dict]:
    out = []
    for entry in registry.list_vms():
        try:
            out.append(registry.describe(entry["id"]))
        except registry.VmNotFound:
            continue                      # ended between listing and asking
        except registry.RegistryError as exc:
            # Listed but not answering (a busy owner): show what we know.
            out.append({**entry, "state": "unknown", "failure": str(exc),
                        "balloon_stats": None, "mounts": [], "volumes": []})
    return out


class VmListHandler(_BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        vms = await self._call(_describe_all)
        self._ok({"vms": vms, "registry": str(registry.registry_dir())})


class VmHandler(_BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, vm_id: str) -> None:
        try:
            self._ok(await self._call(registry.describe, vm_id))
        except registry.RegistryError as exc:
            self._fail_registry(exc)


class VmStopHandler(_BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, vm_id: str) -> None:
        try:
            result = await self._call(registry.request, vm_id, "stop")
        except registry.RegistryError as exc:
            self._fail_registry(exc)
            return
        self._ok({"id": vm_id, **result})


class VmBalloonHandler(_BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, vm_id: str) -> None:
        try:
            body = self._json_body()
        except _BadBody as exc:
            self._fail(400, str(exc), "bad_request")
            return
        target = body.get("target_mib") if isinstance(body, dict) else None
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            self._fail(400, 'the body must be {"target_mib": N} with N a whole number of MiB '
                            f">= 0, got {body!r}", "bad_request")
            return
        try:
            result = await self._call(registry.request, vm_id, "balloon", target_mib=target)
        except registry.RegistryError as exc:
            self._fail_registry(exc)
            return
        self._ok({"id": vm_id, **result})


class NotFoundHandler(_BaseHandler):
    """Anything else under the API prefix: a JSON 404, not the server's HTML page."""

    def _not_found(self, path: str) -> None:
        self._fail(404, f"no such endpoint: {API_PREFIX}/{path}", "not_found")

    # Not ``post = get``: @authorized fixes its action ("read" / "write") at the first call
    # of the function it wraps, so a shared function would check one action for both.
    @web.authenticated
    @authorized
    def get(self, path: str) -> None:
        self._not_found(path)

    @web.authenticated
    @authorized
    def post(self, path: str) -> None:
        self._not_found(path)


def setup_handlers(web_app) -> None:
    base = url_path_join(web_app.settings["base_url"], API_PREFIX)
    web_app.add_handlers(".*$", [
        (url_path_join(base, "vms") + "/?", VmListHandler),
        (url_path_join(base, "vms", VM_ID) + "/?", VmHandler),
        (url_path_join(base, "vms", VM_ID, "stop") + "/?", VmStopHandler),
        (url_path_join(base, "vms", VM_ID, "balloon") + "/?", VmBalloonHandler),
        (url_path_join(base, "(?P<path>.*)"), NotFoundHandler),
    ])
