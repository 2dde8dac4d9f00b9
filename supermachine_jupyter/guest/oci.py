"""Registry → cached bootable rootfs: ``pull("python:3.12-slim")`` returns an :class:`ImageRootfs`
whose ``rootfs`` is a read-only ext4 file made from the image's linux/amd64 variant.

The steps, each done by the tool made for it:

1. **resolve** with ``skopeo inspect --raw``: the manifest digest (for an image index, the
   digest of its linux/amd64 entry). skopeo does the registry work: auth from
   ``--authfile``/``auth_file`` or its usual lookup (``$REGISTRY_AUTH_FILE``,
   ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``), mirrors and
   ``insecure`` registries from ``registries.conf`` (or ``registries_conf=`` /
   ``$CONTAINERS_REGISTRIES_CONF``), TLS.
2. **pull** with ``skopeo copy docker://NAME@DIGEST oci:LAYOUT`` (by digest, so skopeo checks
   every blob and the manifest against what was resolved), relaying skopeo's
   "Copying blob" lines as per-layer progress with the sizes from the manifest.
3. **unpack** with ``umoci unpack --rootless`` (layers in order, whiteouts, hard links, modes
   incl. setuid; no root needed; device nodes become empty files, the guest mounts devtmpfs on
   /dev). umoci writes the files as the caller and keeps each one's owner in the image in the
   ``user.rootlesscontainers`` xattr (absent: root). The tree (setuid files included) lives
   only in the 0700 build dir until the ext4 file is made.
4. **convert** with ``mkfs.ext4 -d`` into a journal-less ext4 file (sparse: headroom costs no
   disk), then ``debugfs -w`` sets every inode whose owner on disk is not the image's to the
   image's uid/gid (mkfs.ext4 -d copies the host owner; e2fsprogs 1.47.0 has neither an
   "all files root" option nor tarball input, which came in 1.47.1). The rootlesscontainers
   xattrs are dropped before mkfs so the image carries none of ours.

**Short names**: a reference with no registry (``python:3.12-slim``, ``alpine``) goes through
skopeo's ``docker://`` normalisation: ``docker.io/library/python:3.12-slim``. The docker
transport does not consult ``unqualified-search-registries`` nor short-name aliases; a
``[[registry]]`` entry for ``docker.io`` with a ``[[registry.mirror]]`` in registries.conf does
apply (a machine without internet access pulls short names from its mirror). A missing tag
means ``latest``.

**Cache** (``$SUPERMACHINE_OCI_CACHE``, default ``<user cache>/supermachine-jupyter/oci``):
``sha256-<hex>/rootfs.ext4`` + ``image.json`` per manifest digest, and ``refs.json`` mapping
each reference as the user wrote it to its digest. ``pull="missing"`` uses the mapping without
asking the registry; ``"always"`` asks the registry for the digest each time and converts only
when the digest is new; ``"never"`` does no network I/O and fails when the reference was never
pulled. Each entry is built in ``.tmp-*`` beside the entries and renamed into place, under a
per-digest lock file: an interrupt or an error leaves no entry, and two processes pulling one
digest convert it once.

**Plain-HTTP registries** (a registry on loopback): ``tls_verify=False``, or
``SUPERMACHINE_OCI_TLS_VERIFY=0`` in the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ImageError
from .assets import cache_dir as _user_cache_dir
from .rootfs import ImageRootfs

PULL_POLICIES = ("missing", "always", "never")
PLATFORM = ("linux", "amd64")
ROOTLESS_XATTR = "user.rootlesscontainers"
TOOLS = {"skopeo": "skopeo", "umoci": "umoci", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs"}

_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
# docker/distribution's reference grammar, loosely: [host[:port]/]path[:tag][@algo:hex].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*" \
          r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_REF_RE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


class OciError(ImageError):
    """An OCI image could not be pulled or converted; the message names the image, the cause
    and what to do."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: ``name`` (maybe with a registry), ``tag``, ``digest``."""
    text: str
    name: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        if not isinstance(text, str) or not text:
            raise OciError(f"image reference {text!r} is empty: give one like "
                           "'python:3.12-slim' or 'registry.example:5000/team/app@sha256:…'")
        m = _REF_RE.match(text)
        first, slash, _ = text.partition("/")
        if m is not None and slash and not ("." in first or ":" in first or first == "localhost") \
                and first != first.lower():
            m = None                # no registry host, so a path component: lowercase only
        if m is None:
            raise OciError(
                f"{text!r} is not a valid image reference: expected "
                "[registry[:port]/]name[:tag][@sha256:digest] with a lowercase name "
                "(e.g. 'python:3.12-slim', 'ghcr.io/org/tool:1.0', '127.0.0.1:5000/app')")
        return cls(text, m["name"], m["tag"], m["digest"])

    def docker(self, digest: str | None = None) -> str:
        """The ``docker://`` transport string; pinned to ``digest`` when given."""
        if digest:
            return f"docker://{self.name}@{digest}"
        suffix = (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        return f"docker://{self.name}{suffix}"


def cache_root() -> Path:
    """Where pulled images live: ``$SUPERMACHINE_OCI_CACHE`` or ``<user cache>/oci``."""
    override = os.environ.get("SUPERMACHINE_OCI_CACHE")
    return Path(override) if override else _user_cache_dir() / "oci"


def _env_tls_verify() -> bool | None:
    value = os.environ.get("SUPERMACHINE_OCI_TLS_VERIFY", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def pull(ref: str, *, pull: str = "missing", progress: Callable[[str], None] = lambda _: None,
         auth_file: Path | None = None, tls_verify: bool | None = None,
         cache_dir: Path | None = None, registries_conf: Path | None = None) -> ImageRootfs:
    """Return image ``ref`` (linux/amd64) as a cached read-only ext4 rootfs, pulling and
    converting it when needed.

    ``pull``: ``"missing"`` (default: use the cached image this reference last resolved to,
    else pull), ``"always"`` (ask the registry for the current digest; convert only when it
    changed), ``"never"`` (cache only; no network). ``progress`` receives one line per step
    and per layer. ``auth_file``: a containers-auth.json / docker config.json (else skopeo's
    usual lookup). ``tls_verify=False`` talks plain HTTP / skips certificate checks (default:
    ``$SUPERMACHINE_OCI_TLS_VERIFY``, then registries.conf). ``cache_dir``: default
    :func:`cache_root`. ``registries_conf``: a registries.conf to use instead of
    /etc/containers/registries.conf and ~/.config/containers/registries.conf (default:
    ``$CONTAINERS_REGISTRIES_CONF``, which podman and buildah honour and skopeo 1.9 does not).
    Raises :class:`OciError` saying what went wrong and what to do.
    """
    parsed = ImageRef.parse(ref)
    if pull not in PULL_POLICIES:
        raise OciError(f"pull={pull!r} for image {ref!r}: use one of {', '.join(PULL_POLICIES)}")
    if auth_file is not None and not Path(auth_file).is_file():
        raise OciError(f"the auth file {auth_file} for image {ref!r} does not exist: give the "
                       "path of an auth.json (`skopeo login --authfile PATH REGISTRY` writes one)")
    if tls_verify is None:
        tls_verify = _env_tls_verify()
    if registries_conf is None and os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        registries_conf = Path(os.environ["CONTAINERS_REGISTRIES_CONF"])
    if registries_conf is not None and not Path(registries_conf).is_file():
        raise OciError(f"the registries.conf {registries_conf} for image {ref!r} does not "
                       "exist: fix the path (or unset CONTAINERS_REGISTRIES_CONF)")
    store = _Store(Path(os.path.abspath(cache_dir if cache_dir is not None else cache_root())))

    if pull != "always":
        cached = store.lookup(ref)
        if cached is None and parsed.digest:      # pinned: cached under any name will do
            cached = store.entry(ref, parsed.digest)
        if cached is not None:
            progress(f"{ref}: cached ({cached.digest})")
            return cached
        if pull == "never":
            raise OciError(f"image {ref!r} is not in the cache {store.root} and pull='never' "
                           "forbids fetching it: pull it once with pull='missing'")
    _need_tools(ref)
    skopeo = _Skopeo(ref, auth_file, tls_verify, registries_conf)
    progress(f"{ref}: resolving")
    digest, manifest = skopeo.resolve(parsed)
    with store.locked(digest):
        entry = store.entry(ref, digest)
        if entry is None:
            entry = _build(store, parsed, digest, manifest, skopeo, progress)
        else:
            progress(f"{ref}: {digest} already converted")
        store.remember(ref, digest)
    return entry


def _need_tools(ref: str) -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise OciError(f"pulling image {ref!r} needs Debian's {', '.join(missing)}: "
                       f"apt-get install {' '.join(missing)}")


class _Skopeo:
    """skopeo invocations for one image, and skopeo's errors turned into :class:`OciError`."""

    def __init__(self, ref: str, auth_file: Path | None, tls_verify: bool | None,
                 registries_conf: Path | None = None):
        self.ref, self.auth_file, self.tls_verify = ref, auth_file, tls_verify
        self.global_opts = ([f"--registries-conf={os.fspath(registries_conf)}"]
                            if registries_conf is not None else [])

    def _opts(self, prefix: str) -> list[str]:
        opts = []
        if self.auth_file is not None:
            opts.append(f"--{prefix}authfile={os.fspath(self.auth_file)}")
        if self.tls_verify is not None:
            opts.append(f"--{prefix}tls-verify={'true' if self.tls_verify else 'false'}")
        return opts

    def inspect_raw(self, transport: str) -> tuple[bytes, str]:
        # a registry that swallows packets would hang a resolve (a copy may take long)
        done = subprocess.run(["skopeo", *self.global_opts, "--command-timeout", "120s",
                               "inspect", "--raw",
                               *self._opts(""), "--", transport],
                              check=False, capture_output=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise self.error(done.stderr.decode(errors="replace"))
        import hashlib
        raw = done.stdout
        return raw, "sha256:" + hashlib.sha256(raw).hexdigest()

    def resolve(self, parsed: ImageRef) -> tuple[str, dict]:
        """The digest and manifest of the linux/amd64 image ``parsed`` names."""
        raw, digest = self.inspect_raw(parsed.docker())
        if parsed.digest and parsed.digest != digest:
            raise OciError(f"image {self.ref!r}: the registry's manifest has digest {digest}, "
                           f"not the {parsed.digest} asked for: the registry is broken or "
                           "tampered with")
        manifest = _json(raw, self.ref, "manifest")
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            chosen = _choose_platform(manifest, self.ref)
            raw, digest = self.inspect_raw(parsed.docker(chosen))
            if digest != chosen:
                raise OciError(f"image {self.ref!r}: the registry served manifest {digest} "
                               f"for {chosen}: the registry is broken or tampered with")
            manifest = _json(raw, self.ref, "manifest")
        if "layers" not in manifest:
            raise OciError(f"image {self.ref!r}: unsupported manifest (schema "
                           f"{manifest.get('schemaVersion')}, {manifest.get('mediaType')}): "
                           "only OCI and Docker schema 2 images can be pulled")
        return digest, manifest

    def copy(self, parsed: ImageRef, digest: str, layout: str, cwd: Path,
             layers: dict[str, int], progress: Callable[[str], None]) -> None:
        """``skopeo copy`` the image pinned to ``digest`` into ``cwd/layout``, relaying its
        per-blob lines as progress."""
        argv = ["skopeo", *self.global_opts, "copy", "--override-os", PLATFORM[0], "--override-arch", PLATFORM[1],
                *self._opts("src-"), "--", parsed.docker(digest), f"oci:{layout}:image"]
        with tempfile.TemporaryFile() as stderr, subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr,
                                      stdin=subprocess.DEVNULL, text=True) as proc:
            try:
                order = list(layers)
                for line in proc.stdout:
                    m = re.match(r"Copying blob (sha256:[0-9a-f]{64})(.*)", line.strip())
                    if m and m[1] in layers:
                        n = order.index(m[1]) + 1
                        note = m[2].strip()
                        progress(f"{self.ref}: layer {n}/{len(order)} {m[1][:19]}… "
                                 f"({_mib(layers[m[1]])}){' ' + note if note else ''}")
                proc.wait()
            except BaseException:
                proc.kill()
                raise
            if proc.returncode != 0:
                stderr.seek(0)
                raise self.error(stderr.read().decode(errors="replace"))

    def error(self, stderr: str) -> OciError:
        """skopeo's failure, said for a notebook user: the cause and what to do."""
        text = stderr.strip()
        m = re.search(r'msg="(.*)"\s*$', text, re.DOTALL)
        detail = (m[1] if m else text).replace('\\"', '"')[-600:]
        low = detail.lower()
        ref = self.ref
        if "server gave http response to https client" in low:
            return OciError(f"image {ref!r}: the registry speaks plain HTTP: pass "
                            "tls_verify=False (or set SUPERMACHINE_OCI_TLS_VERIFY=0) for a "
                            f"local registry ({detail})")
        if "manifest unknown" in low or "name unknown" in low or "not found" in low:
            return OciError(f"image {ref!r} not found: the registry has no such image or tag: "
                            f"check the name and tag ({detail})")
        if any(s in low for s in ("unauthorized", "authentication required", "denied",
                                  "invalid username/password", "401", "403")):
            return OciError(f"image {ref!r}: the registry refused access (auth): log in "
                            "with `skopeo login REGISTRY` or pass auth_file= an auth.json with "
                            f"credentials for it ({detail})")
        if any(s in low for s in ("connection refused", "no such host", "i/o timeout",
                                  "network is unreachable", "no route to host", "dial tcp",
                                  "tls handshake timeout", "connection reset",
                                  "deadline exceeded")):
            return OciError(f"image {ref!r}: the registry is unreachable: check the network, "
                            "the registry's name and port, or configure a mirror in "
                            f"registries.conf ({detail})")
        if "no space left on device" in low:
            return OciError(f"image {ref!r}: the disk is full while pulling: free space or "
                            f"set SUPERMACHINE_OCI_CACHE to a larger disk ({detail})")
        if "no image found in manifest list for architecture" in low:
            return OciError(f"image {ref!r} has no linux/amd64 variant ({detail})")
        return OciError(f"image {ref!r}: skopeo failed: {detail}")


def _json(raw: bytes, ref: str, what: str) -> dict:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise OciError(f"image {ref!r}: the registry sent a {what} that is not JSON") from exc
    if not isinstance(value, dict):
        raise OciError(f"image {ref!r}: the registry sent a {what} that is not a JSON object")
    return value


def _choose_platform(index: dict, ref: str) -> str:
    offered = []
    for entry in index.get("manifests") or []:
        platform = entry.get("platform") or {}
        os_arch = (platform.get("os"), platform.get("architecture"))
        offered.append("/".join(str(p) for p in os_arch) + (
            f"/{platform['variant']}" if platform.get("variant") else ""))
        if os_arch == PLATFORM and isinstance(entry.get("digest"), str) \
                and re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"]):
            return entry["digest"]
    raise OciError(f"image {ref!r} has no linux/amd64 variant (it offers: "
                   f"{', '.join(offered) or 'nothing'}): the VMs run x86-64 Linux; pick an "
                   "image or tag built for linux/amd64")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


class _Store:
    """The on-disk cache: one directory per manifest digest, ``refs.json``, lock files."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def _load(self, path: Path, ref: str, digest: str) -> ImageRootfs | None:
        rootfs, meta = path / "rootfs.ext4", path / "image.json"
        if not (rootfs.is_file() and meta.is_file()):
            return None
        try:
            config = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        return ImageRootfs(ref=ref, digest=digest, rootfs=rootfs,
                           env=tuple(config.get("env", ())),
                           working_dir=config.get("working_dir") or "/",
                           user=config.get("user", ""),
                           entrypoint=tuple(config.get("entrypoint", ())),
                           cmd=tuple(config.get("cmd", ())))

    def entry(self, ref: str, digest: str) -> ImageRootfs | None:
        return self._load(self._dir(digest), ref, digest)

    def _refs(self) -> dict:
        try:
            value = json.loads((self.root / "refs.json").read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def lookup(self, ref: str) -> ImageRootfs | None:
        digest = self._refs().get(ref)
        return self.entry(ref, digest) if isinstance(digest, str) else None

    def remember(self, ref: str, digest: str) -> None:
        with self._lock("refs"):
            refs = self._refs()
            if refs.get(ref) == digest:
                return
            refs[ref] = digest
            try:
                _write_atomic(self.root / "refs.json", json.dumps(refs, indent=1,
                                                                  sort_keys=True))
            except OSError as exc:
                raise OciError(f"image {ref!r} is cached, but the cache's index "
                               f"{self.root / 'refs.json'} cannot be written ({exc.strerror}): "
                               "free space there or fix its permissions") from exc

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self.root / f".{name}.lock", "w")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise OciError(f"the image cache {self.root} cannot be written ({exc.strerror}): "
                           "set SUPERMACHINE_OCI_CACHE to a writable directory") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def locked(self, digest: str):
        """One builder per digest across processes."""
        return self._lock(digest.replace(":", "-"))

    def workdir(self) -> Path:
        """A fresh build directory beside the entries (same file system: rename is atomic).
        Build directories of processes that died (SIGKILL, power loss) are swept first."""
        for stale in [*self.root.glob(".tmp-*-*"), *self.root.glob(".trash-*-*")]:
            pid = stale.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.root))

    def discard(self, work: Path) -> None:
        """Delete a finished build directory in a background thread (an unpacked rootfs takes
        a while to delete): renamed to ``.trash-PID-*`` first so it is never taken for a
        build in progress; one left by a process that exited is swept by the next build."""
        trash = work.with_name(".trash-" + work.name[len(".tmp-"):])
        try:
            os.rename(work, trash)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            return
        threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True},
                         name="oci-trash", daemon=True).start()

    def commit(self, built: Path, digest: str) -> None:
        os.rename(built, self._dir(digest))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _build(store: _Store, parsed: ImageRef, digest: str, manifest: dict, skopeo: _Skopeo,
           progress: Callable[[str], None]) -> ImageRootfs:
    """Pull, unpack and convert ``digest`` in a temporary directory, then rename it into the
    cache. Anything that goes wrong removes the temporary directory."""
    ref = parsed.text
    layers = {layer["digest"]: int(layer.get("size", 0)) for layer in manifest["layers"]
              if isinstance(layer, dict) and isinstance(layer.get("digest"), str)}
    work = store.workdir()
    try:
        try:
            started = time.monotonic()
            progress(f"{ref}: pulling {len(layers)} layer(s), {_mib(sum(layers.values()))}")
            # relative paths with cwd=work: "oci:PATH:TAG" and umoci's "PATH:TAG" split on ':'
            skopeo.copy(parsed, digest, "layout", work, layers, progress)
            config = _image_config(work / "layout", ref)
            progress(f"{ref}: unpacking")
            _run(["umoci", "unpack", "--rootless", "--image", "layout:image", "bundle"],
                 cwd=work, ref=ref, what="unpacking")
            shutil.rmtree(work / "layout")
            rootfs = work / "bundle" / "rootfs"
            owners, size = _scan_rootfs(rootfs, ref)
            entry = work / "entry"
            entry.mkdir()
            fs_bytes = _fs_size(size)
            progress(f"{ref}: converting to ext4 ({fs_bytes // 2**20} MiB)")
            _mkfs(rootfs, entry / "rootfs.ext4", fs_bytes, size.inodes, owners, ref)
            (entry / "rootfs.ext4").chmod(0o444)
            _write_atomic(entry / "image.json", json.dumps(
                {"digest": digest, "ref": ref, **config}, indent=1))
            store.commit(entry, digest)
        except _DiskFull as exc:
            raise _disk_full(ref, store.root, str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(ref, store.root, str(exc)) from exc
            raise OciError(f"image {ref!r}: converting it failed: {exc}") from exc
        progress(f"{ref}: ready in {time.monotonic() - started:.1f} s ({digest})")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    store.discard(work)          # the unpacked tree: deleted off the caller's critical path
    loaded = store.entry(ref, digest)
    assert loaded is not None
    return loaded


class _DiskFull(Exception):
    """A tool ran out of space; _build turns it into the OciError that names the cache."""


def _disk_full(ref: str, where: Path, detail: str) -> OciError:
    return OciError(f"image {ref!r}: the disk is full while converting it in {where}: free "
                    "space there or set SUPERMACHINE_OCI_CACHE to a directory on a larger "
                    f"disk; nothing was cached ({detail.strip()[-300:]})")


#: Free space below which a failed tool is taken to have run out of disk: umoci sometimes
#: dies of ENOSPC with a Go stack dump that never says so.
NEARLY_FULL_BYTES = 256 * 1024


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES


def _run(argv: list[str], *, cwd: Path, ref: str, what: str,
         stdin: str | None = None) -> None:
    done = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        if "no space left on device" in detail.lower() or "could not allocate block" \
                in detail.lower() or _nearly_full(cwd):
            raise _DiskFull(detail)
        raise OciError(f"image {ref!r}: {what} failed ({argv[0]} exit {done.returncode}): "
                       f"{detail[-800:]}")


def _image_config(layout: Path, ref: str) -> dict:
    """The image config's Env, WorkingDir, User, Entrypoint, Cmd, from the pulled layout."""
    def blob(digest: str) -> dict:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise OciError(f"image {ref!r}: bad digest {digest!r} in the pulled layout")
        return _json((layout / "blobs" / algo / hexpart).read_bytes(), ref, "blob")

    index = _json((layout / "index.json").read_bytes(), ref, "index")
    manifest = blob(index["manifests"][0]["digest"])
    config = blob(manifest["config"]["digest"])
    arch, os_name = config.get("architecture"), config.get("os")
    if (os_name, arch) != PLATFORM:
        raise OciError(f"image {ref!r} is built for {os_name}/{arch}, and has no linux/amd64 "
                       "variant: the VMs run x86-64 Linux; pick an image built for linux/amd64")
    c = config.get("config") or {}

    def strings(value) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else []
    return {"env": strings(c.get("Env")), "working_dir": str(c.get("WorkingDir") or "/"),
            "user": str(c.get("User") or ""), "entrypoint": strings(c.get("Entrypoint")),
            "cmd": strings(c.get("Cmd"))}


@dataclasses.dataclass
class _TreeSize:
    data: int = 0          # bytes of file contents and directories, rounded up to blocks
    inodes: int = 0


def _rootless_owner(value: bytes) -> tuple[int, int]:
    """Decode umoci's rootlesscontainers protobuf: field 1 uid, field 2 gid (varints)."""
    ids = {1: 0, 2: 0}
    i = 0
    while i < len(value):
        key, i = _varint(value, i)
        if key & 7 != 0:
            raise ValueError("unexpected wire type")
        number, i = _varint(value, i)
        ids[key >> 3] = number
    return ids[1], ids[2]


def _varint(value: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = value[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _scan_rootfs(rootfs: Path, ref: str) -> tuple[list[tuple[str, int, int]], _TreeSize]:
    """Walk the unpacked tree: the inodes whose owner on disk differs from the image's (from
    umoci's xattr; absent means root), with those xattrs removed; and the tree's size."""
    owners: list[tuple[str, int, int]] = []
    size = _TreeSize()
    seen: set[int] = set()
    block = 4096
    for dirpath, dirnames, filenames in os.walk(rootfs):
        paths = [dirpath]                    # a directory: handled when walked into
        paths += [os.path.join(dirpath, n) for n in dirnames
                  if os.path.islink(os.path.join(dirpath, n))]
        paths += [os.path.join(dirpath, n) for n in filenames]
        for path in paths:
            st = os.lstat(path)
            if st.st_ino in seen:
                continue                     # a hard link: one inode
            seen.add(st.st_ino)
            size.inodes += 1
            size.data += -(-st.st_size // block) * block + block
            want = (0, 0)
            if not os.path.islink(path):
                try:
                    raw = os.getxattr(path, ROOTLESS_XATTR, follow_symlinks=False)
                except OSError:
                    raw = None
                if raw is not None:
                    try:
                        want = _rootless_owner(raw)
                    except (ValueError, IndexError) as exc:
                        raise OciError(f"image {ref!r}: umoci left an unreadable owner "
                                       f"on {path}") from exc
                    os.removexattr(path, ROOTLESS_XATTR, follow_symlinks=False)
            if (st.st_uid, st.st_gid) != want:
                rel = "/" + os.path.relpath(path, rootfs) if path != str(rootfs) else "/"
                owners.append((rel, *want))
    return owners, size


def _fs_size(size: _TreeSize) -> int:
    """Room for the tree, its inodes and ext4's metadata, plus headroom (the file is sparse,
    so headroom costs no disk)."""
    raw = size.data + size.inodes * 256
    return max(16 * 2**20, int(raw * 1.25) + 32 * 2**20) // 4096 * 4096


def _debugfs_quote(path: str, ref: str) -> str:
    if "\n" in path or "\r" in path or "\0" in path:
        raise OciError(f"image {ref!r} has a file name with a line break ({path!r}) whose "
                       "owner cannot be set: this image cannot be converted")
    return '"' + path.replace('"', '""') + '"'


def _mkfs(rootfs: Path, out: Path, fs_bytes: int, inodes: int,
          owners: list[tuple[str, int, int]], ref: str) -> None:
    _run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal",
          "-N", str(inodes + inodes // 4 + 1024), "-L", "oci-rootfs",
          "-E", "root_owner=0:0", "-d", str(rootfs), "--", str(out), f"{fs_bytes // 1024}k"],
         cwd=out.parent, ref=ref, what="mkfs.ext4 -d")
    if not owners:
        return
    script = "".join(
        f"sif {_debugfs_quote(path, ref)} uid {uid}\nsif {_debugfs_quote(path, ref)} gid {gid}\n"
        for path, uid, gid in owners)
    cmds = out.parent / "owners.debugfs"
    cmds.write_text(script)
    done = subprocess.run(["debugfs", "-w", "-f", str(cmds), "--", str(out)],
                          check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    cmds.unlink()
    # debugfs exits 0 even when a command failed: its errors are the lines that are not the
    # echo of a command ("debugfs: sif ...") nor its banner
    errors = [line for line in done.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs")]
    if done.returncode != 0 or errors:
        detail = "\n".join(errors[-5:]) or done.stderr[-500:]
        if "no space" in detail.lower():
            raise _DiskFull(detail)
        raise OciError(f"image {ref!r}: setting file owners in the ext4 image failed: {detail}")
