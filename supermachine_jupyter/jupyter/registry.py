"""The runtime registry of live VMs: every running ``Vm`` on this machine, whatever kernel,
script or engine owns it, so that a Jupyter server (and its sidebar) can list and control them.

Layout, in ``<jupyter runtime dir>/supermachine-vms/`` (or ``$SUPERMACHINE_REGISTRY_DIR``)::

    <id>.json     who owns the VM and how it was configured (written atomically)
    <id>.sock     the VM's control socket, served by a daemon thread of the owning process

A control request is one line of JSON (``{"op": "state"}``) and gets one line back
(``{"ok": true, "result": …}`` or ``{"ok": false, "kind": …, "error": …}``). The operations:

==================  ==========================================================================
``state``           ``{"state", "failure"}``
``balloon_stats``   ``BalloonStats.to_dict()``; kind ``no_balloon`` when the VM has none
``mounts``          ``{"mounts": [MountStatus.to_dict()…], "volumes": vm.volumes()}``
``describe``        all three at once, and ``host_memory_bytes`` (what the REST API and the
                    sidebar poll)
``stop``            stops the VM, answers ``{"state"}`` once it has stopped
``balloon``         ``{"target_mib": n}`` → ``vm.set_balloon_target(n)``
==================  ==========================================================================

Entries whose owner process is gone (pid dead or reused) or whose socket refuses connections
are removed whenever the registry is read. The launcher lists a VM from the moment it
starts booting (:func:`announce`: state ``booting``, no engine yet; ``stop`` and
``balloon`` answer ``not_running``), the running ``Vm`` takes that entry over, keeping its
id (:func:`publish`), and withdraws it when it ends; nothing else needs calling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VmError

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..vm import Vm

log = logging.getLogger(__name__)

#: Overrides where the registry lives (default: the Jupyter runtime dir's ``supermachine-vms``).
REGISTRY_DIR_ENV = "SUPERMACHINE_REGISTRY_DIR"
REGISTRY_DIRNAME = "supermachine-vms"
#: Bumped when the entry or control protocol changes incompatibly.
REGISTRY_VERSION = 1
#: Registry ids: 12 lowercase hex digits (safe in file names and URLs).
ID_RE = re.compile(r"[0-9a-f]{12}")
#: A unix socket path must fit ``sockaddr_un.sun_path`` (108 bytes with the NUL).
SOCKET_PATH_MAX_BYTES = 100
REQUEST_MAX_BYTES = 64 * 1024
#: Seconds a control request may take; ``stop`` waits for the guest to power off.
REQUEST_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 30.0
OPS = ("state", "balloon_stats", "mounts", "describe", "stop", "balloon")


class RegistryError(VmError):
    """A registry request could not be carried out."""
    #: machine-readable reason: ``not_found``, ``bad_request``, ``no_balloon``,
    #: ``not_running``, ``timeout``, ``internal``
    kind = "internal"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class VmNotFound(RegistryError):
    """No live VM has this registry id (it never existed, or it has ended)."""
    kind = "not_found"


# -- where things live ----------------------------------------------------------------------
def registry_dir() -> Path:
    """The registry directory, read from the environment at each call."""
    override = os.environ.get(REGISTRY_DIR_ENV)
    if override:
        return Path(override)
    from jupyter_core.paths import jupyter_runtime_dir
    return Path(jupyter_runtime_dir()) / REGISTRY_DIRNAME


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _socket_path(directory: Path, vm_id: str) -> Path:
    """``<dir>/<id>.sock``, or a short private directory when that path is too long for a
    unix socket (deep runtime dirs, e.g. under pytest's tmp_path)."""
    path = directory / f"{vm_id}.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX_BYTES:
        return path
    short = _ensure_dir(Path(tempfile.gettempdir()) / f"sm-vms-{os.getuid()}")
    return short / f"{vm_id}.sock"


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# -- owner identity ---------------------------------------------------------------------------
def _process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                     # alive, owned by someone else
    except OSError:
        return False
    if start_ticks is not None:
        now = _process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False         # the pid was reused by another process
    return True


def _kernel_identity() -> tuple[str | None, str | None]:
    """(kernel id, notebook path) when this process is an ipykernel started by Jupyter."""
    kernel_id = None
    import sys
    if "ipykernel.kernelapp" in sys.modules:
        try:
            from ipykernel.kernelapp import IPKernelApp
            if IPKernelApp.initialized():
                name = os.path.basename(IPKernelApp.instance().connection_file or "")
                match = re.fullmatch(r"kernel-(.+)\.json", name)
                kernel_id = match.group(1) if match else None
        except Exception:  # noqa: BLE001 - identity is best effort
            kernel_id = None
    return kernel_id, os.environ.get("JPY_SESSION_NAME") or None


# -- the owning side: publish, serve, withdraw ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Booting:
    """What is known of a VM that is still booting (its entry until the ``Vm`` exists)."""
    name: str
    config: VmConfig
    memory_mib: int
    vcpus: int
    started_at: float


class _Published:
    """One published VM (or one still booting): its entry file and its control socket."""

    def __init__(self, vm: Vm | Booting, vm_id: str, directory: Path):
        self.vm = vm
        self.id = vm_id
        self.json_path = directory / f"{vm_id}.json"
        self.socket_path = _socket_path(directory, vm_id)
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.socket_path.unlink(missing_ok=True)
            self._listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            self._listener.listen(16)
        except BaseException:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"vm-registry-{vm.name}")
        self._thread.start()

    def entry(self) -> dict[str, Any]:
        vm = self.vm
        kernel_id, notebook = _kernel_identity()
        pid = os.getpid()
        booting = isinstance(vm, Booting)
        return {
            "version": REGISTRY_VERSION,
            "id": self.id,
            "name": vm.name,
            "pid": pid,
            "pid_start": _process_start_ticks(pid),
            "booting": booting,
            "engine": "" if booting else vm.engine,
            "accel": "" if booting else vm.accel,
            "reason": "booting" if booting else vm.engine_reason,
            "config": vm.config.to_dict(),
            "memory_mib": vm.memory_mib,
            "vcpus": vm.vcpus,
            "balloon": bool(vm.config.balloon),
            "started_at": vm.started_at,
            "boot_seconds": None if booting else vm.boot_seconds,
            "kernel_id": kernel_id,
            "notebook": notebook,
            "socket": str(self.socket_path),
        }

    def close(self) -> None:
        """Remove the entry first, then stop listening (readers never see a refusing socket
        for a listed VM that is merely ending)."""
        if self._closed:
            return
        self._closed = True
        self.json_path.unlink(missing_ok=True)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() below on Linux
        except OSError:
            pass
        self._listener.close()
        self.socket_path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name=f"vm-registry-req-{self.vm.name}").start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                line = _read_line(conn)
            except (OSError, ValueError):
                return
            if not line:
                return                       # a liveness probe: connect and close
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise RegistryError("a request is a JSON object", "bad_request")
                reply = {"ok": True, "result": self._dispatch(request)}
            except RegistryError as exc:
                reply = {"ok": False, "kind": exc.kind, "error": str(exc)}
            except RecursionError:           # [[[[…]]]]: JSON nested beyond the parser
                reply = {"ok": False, "kind": "bad_request",
                         "error": "the request is nested too deeply"}
            except ValueError as exc:        # bad JSON, or a bad value the VM refused
                reply = {"ok": False, "kind": "bad_request", "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - report, never kill the server thread
                log.exception("registry request failed")
                reply = {"ok": False, "kind": "internal", "error": f"{type(exc).__name__}: {exc}"}
            try:
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                pass

    def _dispatch(self, request: dict) -> Any:
        from ..devices.balloon import BalloonNotEnabled
        from ..errors import VmStoppedError
        vm, op = self.vm, request.get("op")
        if isinstance(vm, Booting):
            if op in ("state", "describe"):
                return {"state": "booting", "failure": None, "balloon_stats": None,
                        "mounts": [], "volumes": [], "host_memory_bytes": None}
            if op in ("balloon_stats", "mounts", "stop", "balloon"):
                raise RegistryError(f"VM {vm.name!r} is still booting: {op} once it runs",
                                    "not_running")
            raise RegistryError(f"unknown operation {op!r}; known: {', '.join(OPS)}",
                                "bad_request")
        try:
            if op == "state":
                return _state(vm)
            if op == "balloon_stats":
                return vm.balloon_stats().to_dict()
            if op == "mounts":
                return _mounts(vm)
            if op == "describe":
                return {**_state(vm), "balloon_stats": _balloon_or_none(vm), **_mounts(vm),
                        "host_memory_bytes": vm.host_memory_bytes()}
            if op == "stop":
                vm.stop()
                return {"state": vm.state}
            if op == "balloon":
                target = request.get("target_mib")
                if not isinstance(target, int) or isinstance(target, bool):
                    raise RegistryError(f"balloon needs an integer target_mib, got {target!r}",
                                        "bad_request")
                vm.set_balloon_target(target)
                return {"target_mib": target}
        except BalloonNotEnabled as exc:
            raise RegistryError(str(exc), "no_balloon") from exc
        except VmStoppedError as exc:
            raise RegistryError(str(exc), "not_running") from exc
        raise RegistryError(f"unknown operation {op!r}; known: {', '.join(OPS)}", "bad_request")


def _state(vm: "Vm") -> dict:
    return {"state": vm.state, "failure": vm.failure}


def _mounts(vm: "Vm") -> dict:
    return {"mounts": [m.to_dict() for m in vm.mounts()], "volumes": vm.volumes()}


def _balloon_or_none(vm: "Vm") -> dict | None:
    if not vm.config.balloon or vm.state != "running":
        return None
    try:
        return vm.balloon_stats().to_dict()
    except Exception as exc:  # noqa: BLE001 - a VM ending between the check and the read
        log.debug("balloon stats of %s: %s", vm.name, exc)
        return None


def _read_line(conn: socket.socket, max_bytes: int | None = REQUEST_MAX_BYTES) -> bytes:
    """One newline-terminated message (requests are bounded; replies from our own VMs not)."""
    data = bytearray()
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError("request too large")
    return bytes(data).split(b"\n", 1)[0]


_lock = threading.Lock()
_published: dict[int, _Published] = {}     # id(vm) → entry


def _new_entry(vm: Vm | Booting) -> _Published | None:
    """A listed entry with its socket served, or None (logged) when the registry cannot be
    written."""
    try:
        directory = _ensure_dir(registry_dir())
        entry = _Published(vm, secrets.token_hex(6), directory)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot publish VM %s in the registry: %s", vm.name, exc)
        return None
    return entry if _write_entry(entry) else None


def _write_entry(entry: _Published) -> bool:
    """(Re)write ``entry``'s JSON file; on failure close the entry, log, and return False."""
    try:
        _atomic_write_json(entry.json_path, entry.entry())
    except Exception as exc:  # noqa: BLE001
        entry.close()
        log.warning("cannot publish VM %s in the registry: %s", entry.vm.name, exc)
        return False
    return True


class Announcement:
    """The registry entry of a VM that is booting: hand it to :func:`publish` once the VM
    runs (the entry keeps its id), or :meth:`close` it when the boot fails."""

    def __init__(self, entry: _Published | None):
        self._entry = entry

    @property
    def id(self) -> str | None:
        return self._entry.id if self._entry is not None else None

    def close(self) -> None:
        """Withdraw the booting entry (the boot failed or was interrupted)."""
        if self._entry is not None:
            self._entry.close()
            self._entry = None

    def _take(self) -> _Published | None:
        entry, self._entry = self._entry, None
        return entry

    def __repr__(self) -> str:
        return f"<Announcement {self.id or 'withdrawn'}>"


def announce(name: str, config: VmConfig, memory_mib: int, vcpus: int) -> Announcement:
    """List a VM that starts booting now (state ``booting``), so the sidebar shows it before
    its guest answers. Never raises (see :func:`publish`)."""
    return Announcement(_new_entry(Booting(name, config, memory_mib, vcpus, time.time())))


def publish(vm: "Vm", announcement: Announcement | None = None) -> str | None:
    """List ``vm`` in the registry and serve its control socket. Returns its registry id.
    With the ``announcement`` of its boot, its booting entry becomes the VM's (same id).

    Never raises: a registry that cannot be written (read-only runtime dir, …) only costs
    the sidebar its view of this VM, so it is logged and ``None`` is returned.
    """
    with _lock:
        if id(vm) in _published:
            return _published[id(vm)].id
    entry = announcement._take() if announcement is not None else None
    if entry is not None:
        entry.vm = vm                   # the booting entry becomes the VM's, same id
        if not _write_entry(entry):
            return None
    else:
        entry = _new_entry(vm)
        if entry is None:
            return None
    with _lock:
        _published[id(vm)] = entry
    if vm.state in ("stopped", "failed"):
        withdraw(vm)        # it ended while we were publishing it
    return entry.id


def withdraw(vm: "Vm") -> None:
    """Remove ``vm`` from the registry (safe to call repeatedly, or for unpublished VMs)."""
    with _lock:
        entry = _published.pop(id(vm), None)
    if entry is not None:
        entry.close()


def vm_id(vm: "Vm") -> str | None:
    """The registry id of a VM this process published, or None."""
    with _lock:
        entry = _published.get(id(vm))
    return entry.id if entry is not None else None


# -- the reading side -------------------------------------------------------------------------
def _remove_entry(json_path: Path, entry: dict | None) -> None:
    json_path.unlink(missing_ok=True)
    sock = (entry or {}).get("socket")
    if isinstance(sock, str) and sock.endswith(".sock"):
        Path(sock).unlink(missing_ok=True)


def _socket_refuses(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False         # busy or slow is not gone
    finally:
        probe.close()


def _load(json_path: Path, probe: bool = True) -> dict | None:
    """The entry at ``json_path`` if its VM is live; removes it (and returns None) if not."""
    try:
        with open(json_path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        # Writes are atomic, so an unreadable entry is damage, not a write in progress.
        _remove_entry(json_path, None)
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
        _remove_entry(json_path, None)
        return None
    if not _pid_alive(entry["pid"], entry.get("pid_start")) or (
            probe and _socket_refuses(str(entry.get("socket", "")))):
        log.info("removing stale registry entry %s (%s, pid %s)", entry.get("id"),
                 entry.get("name"), entry.get("pid"))
        _remove_entry(json_path, entry)
        return None
    return entry


_TMP_RE = re.compile(r"\.[0-9a-f]{12}\.json\.tmp-(\d+)-\d+")


def list_vms() -> list[dict]:
    """Every live VM's entry, oldest first. Stale entries are removed on the way."""
    directory = registry_dir()
    try:
        names = list(directory.iterdir())
    except FileNotFoundError:
        return []
    paths = [p for p in names if p.suffix == ".json" and ID_RE.fullmatch(p.stem)]
    for p in names:           # a writer killed between write and rename leaves its temp file
        match = _TMP_RE.fullmatch(p.name)
        if match and not _pid_alive(int(match.group(1)), None):
            p.unlink(missing_ok=True)
    entries = [e for e in (_load(p) for p in paths) if e is not None]
    return sorted(entries, key=lambda e: (e.get("started_at") or 0, e.get("id", "")))


def get(vm_id: str) -> dict:
    """The entry of a live VM; :class:`VmNotFound` if there is none (or it is stale)."""
    if not isinstance(vm_id, str) or not ID_RE.fullmatch(vm_id):
        raise VmNotFound(f"no VM with id {vm_id!r} (ids are 12 hex digits)")
    entry = _load(registry_dir() / f"{vm_id}.json")
    if entry is None:
        raise VmNotFound(f"no running VM with id {vm_id!r}")
    return entry


def request(vm_id: str, op: str, timeout: float | None = None, **args: Any) -> Any:
    """Send one control request to the process that owns VM ``vm_id``; returns its result.

    Raises :class:`VmNotFound` when the VM is gone and :class:`RegistryError` (with a
    ``kind``) when the owner refused or failed the request.
    """
    if op not in OPS:
        raise RegistryError(f"unknown operation {op!r}; known: {', '.join(OPS)}", "bad_request")
    entry = get(vm_id)
    if timeout is None:
        timeout = STOP_TIMEOUT_S if op == "stop" else REQUEST_TIMEOUT_S
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(entry["socket"])
        except (ConnectionRefusedError, FileNotFoundError):
            _remove_entry(registry_dir() / f"{vm_id}.json", entry)
            raise VmNotFound(f"VM {entry.get('name')!r} ({vm_id}) has ended") from None
        conn.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        reply = _read_reply(conn)
    except socket.timeout:
        raise RegistryError(f"VM {entry.get('name')!r} ({vm_id}) did not answer {op!r} "
                            f"within {timeout:g} s", "timeout") from None
    except OSError as exc:   # the owner reset the connection mid-request (it is ending)
        raise RegistryError(f"VM {entry.get('name')!r} ({vm_id}) dropped the {op!r} "
                            f"request: {exc}", "internal") from None
    finally:
        conn.close()
    if not reply:
        raise RegistryError(f"VM {entry.get('name')!r} ({vm_id}) closed the connection "
                            f"without answering {op!r}", "internal")
    if not reply.get("ok"):
        raise (VmNotFound if reply.get("kind") == "not_found" else RegistryError)(
            reply.get("error", "request failed"), reply.get("kind", "internal"))
    return reply.get("result")


def _read_reply(conn: socket.socket) -> dict | None:
    line = _read_line(conn, max_bytes=None)
    if not line:
        return None
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise RegistryError(f"unreadable reply from the VM's owner: {type(exc).__name__}",
                            "internal") from None
    return reply if isinstance(reply, dict) else None


def describe(vm_id: str) -> dict:
    """The entry of a VM together with its live state, balloon stats and mounts."""
    entry = get(vm_id)
    live = request(vm_id, "describe")
    return {**entry, **live, "uptime_s": max(0.0, time.time() - (entry.get("started_at") or 0))}


__all__ = ["announce", "Announcement", "publish", "withdraw", "vm_id", "list_vms", "get",
           "request", "describe", "registry_dir", "RegistryError", "VmNotFound",
           "REGISTRY_DIR_ENV", "OPS"]
