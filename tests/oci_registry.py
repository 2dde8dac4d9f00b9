"""A real OCI registry on loopback and the test images it serves, built here from Debian packages.

``Registry`` runs Debian's ``docker-registry`` on 127.0.0.1 (a random free port, storage and
config in a temporary directory, optionally htpasswd basic auth) and keeps its access log, so a
test can tell whether a pull talked to it. Its test images (``with_test_images()``; each
built with ``umoci`` and pushed with ``skopeo`` on first ``ref(name)``):

- ``busybox``: busybox-static, a non-root user ``app`` (uid 1000) owning /home/app, a hard link,
  a setuid file, and a second layer that deletes ``/etc/deleted-by-layer-2`` (a whiteout); its
  config has Env, WorkingDir, User, Entrypoint and Cmd (``BUSYBOX_CONFIG``);
- ``multi``: an image index with a linux/amd64 and a linux/arm64 image, each with
  ``/etc/platform`` naming its platform;
- ``arm64only``: a single linux/arm64 image;
- ``python``: Debian's python3-minimal + dash from ``mmdebstrap --variant=extract`` (a 35 MB
  tarball, ~10 s to build, cached in the user cache keyed by everything that went into it, so
  only the first run of a machine builds it), plus a small layer with what the boot tests
  look at (``APP_TREE``: user ``alice`` 1000 in group ``staff`` 50, the working dir /srv/app
  with a service script, /root, /proc, /sys, /run); its config (``PYTHON_CONFIG``) has Env
  with GREETING, WorkingDir /srv/app, User alice, and runs the service (Entrypoint python3,
  Cmd /srv/app/service.py: it counts its starts and beats a heartbeat, "START BEAT", in
  /var/lib/app, the data dir a volume goes on). Its /dev holds empty files where the tarball had device nodes
  (umoci --rootless): the guest mounts devtmpfs over it.
- ``toolless``: ``APP_TREE`` and the same Env/WorkingDir/User, and not a single program (as a
  distroless image without a shell).

The conftest fixtures ``oci_registry`` / ``oci_auth_registry`` (session-scoped) hand these out:
``reg.ref("busybox")`` is the pullable reference (plain HTTP: pull with ``tls_verify=False`` or
``SUPERMACHINE_OCI_TLS_VERIFY=0``), ``reg.requests()`` the access log so far.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TOOLS = ("docker-registry", "skopeo", "umoci", "mmdebstrap", "mkfs.ext4", "debugfs")

BUSYBOX_CONFIG = {
    "env": ("PATH=/bin:/usr/bin", "GREETING=hello from the image"),
    "working_dir": "/home/app",
    "user": "app",
    "entrypoint": ("/bin/sh", "-c"),
    "cmd": ("echo $GREETING",),
}

# alice's images (python, toolless): who runs their commands, where, with what Env.
APP_CONFIG = {
    "env": ("PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"),
    "working_dir": "/srv/app",
    "user": "alice",
}
SERVICE_DATA_DIR = "/var/lib/app"
# The Python image's service: counts its starts in the data dir, then beats a heartbeat there.
SERVICE_PY = f"""\
import os, time
data = {SERVICE_DATA_DIR!r}
with open(os.path.join(data, "starts"), "a") as f:
    f.write("start\\n")
with open(os.path.join(data, "starts")) as f:
    starts = len(f.read().split())
print("service up as", os.getuid(), "in", os.getcwd(), "start", starts, flush=True)
beat = 0
while True:
    beat += 1
    with open(os.path.join(data, "heartbeat.tmp"), "w") as f:
        f.write(f"{{starts}} {{beat}}")
    os.replace(os.path.join(data, "heartbeat.tmp"), os.path.join(data, "heartbeat"))
    time.sleep(0.2)
"""
PYTHON_CONFIG = {**APP_CONFIG, "entrypoint": ("python3",), "cmd": ("/srv/app/service.py",)}
# The tree every one of alice's images has (see _write_tree).
APP_TREE: dict[str, tuple[int, int, int, bytes | str | None]] = {
    "/etc": (0o755, 0, 0, None),
    "/etc/passwd": (0o644, 0, 0, (b"root:x:0:0:root:/root:/bin/sh\n"
                                  b"alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
                                  b"nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")),
    "/etc/group": (0o644, 0, 0, (b"root:x:0:\nstaff:x:50:alice\nalice:x:1000:\n"
                                 b"nogroup:x:65534:\n")),
    "/home": (0o755, 0, 0, None),
    "/home/alice": (0o755, 1000, 1000, None),
    "/srv": (0o755, 0, 0, None),
    "/srv/app": (0o755, 0, 0, None),
    "/srv/app/README": (0o644, 0, 0, b"the image's working directory\n"),
    "/root": (0o700, 0, 0, None),
    "/proc": (0o555, 0, 0, None),
    "/sys": (0o555, 0, 0, None),
    "/run": (0o755, 0, 0, None),
    "/tmp": (0o1777, 0, 0, None),
}

# The Python image: what mmdebstrap installs and how; the cache key is a hash of this.
PYTHON_SUITE = "bookworm"
PYTHON_PACKAGES = ("python3-minimal", "dash")
# extract: unpack the packages and their dependencies without maintainer scripts -- 35 MB
# instead of 126 MB for --variant=essential; python3 runs (its stdlib is the minimal one: sys,
# os, re, ... but not json), dash gives /bin/sh.
PYTHON_MMDEBSTRAP_ARGS = (
    "--variant=extract",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry on 127.0.0.1, plain HTTP, storage in ``workdir``."""

    def __init__(self, workdir: Path, *, user: str | None = None, password: str | None = None):
        self.workdir = Path(workdir)
        self.user, self.password = user, password
        self.log_path = self.workdir / "registry.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.images: TestImages | None = None   # set by with_test_images()

    @property
    def url(self) -> str:
        """host:port, as it goes into an image reference."""
        return f"127.0.0.1:{self.port}"

    def ref(self, name: str, tag: str = "latest") -> str:
        """The reference of test image ``name`` (built and pushed on first use; see
        ``TEST_IMAGES``), or of any ``name`` when this registry has no test images."""
        if self.images is not None and name in TEST_IMAGES:
            self.images.ensure(name)
        return f"{self.url}/{name}:{tag}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(self.workdir / 'storage'))}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.user:
            import bcrypt  # the registry's htpasswd only takes bcrypt hashes
            hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            (self.workdir / "htpasswd").write_text(f"{self.user}:{hashed}\n")
            lines += ["auth:", "  htpasswd:", "    realm: test",
                      f"    path: {json.dumps(str(self.workdir / 'htpasswd'))}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):           # another process may take the port we picked
            self.port = _free_port()
            config = self.workdir / "config.yml"
            config.write_text(self._config())
            log = open(self.log_path, "ab")  # noqa: SIM115 - the registry's, closed in stop()
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(f"http://{self.url}/v2/", timeout=2).close()
                    return self
                except urllib.error.HTTPError as exc:
                    if exc.code == 401:         # up, and asking for credentials
                        return self
                except OSError:
                    pass
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"docker-registry did not start; its log:\n{self.log_text()[-2000:]}")

    def with_test_images(self, **kwargs) -> Registry:
        self.images = TestImages(self, self.workdir / "images", **kwargs)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[str]:
        """The HTTP requests the registry served so far (access-log lines: 'GET /v2/… 200')."""
        return [line for line in self.log_text().splitlines() if '"GET /v2' in line
                or '"HEAD /v2' in line or '"PUT /v2' in line or '"POST /v2' in line
                or '"PATCH /v2' in line]

    def write_authfile(self, path: Path, *, password: str | None = None) -> Path:
        """An auth.json (the containers-auth.json format skopeo reads) for this registry."""
        token = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.url: {"auth": token}}}))
        return path

    def skopeo_auth_args(self, flag: str = "--dest-creds") -> list[str]:
        return [f"{flag}={self.user}:{self.password}"] if self.user else []

    def put_manifest(self, name: str, tag: str, body: bytes, media_type: str) -> None:
        """PUT a manifest (here: an image index skopeo cannot assemble) straight to the API."""
        request = urllib.request.Request(
            f"http://{self.url}/v2/{name}/manifests/{tag}", data=body, method="PUT",
            headers={"Content-Type": media_type})
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        urllib.request.urlopen(request, timeout=10).close()


def _run(argv: list[str], **kwargs) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {' '.join(argv)}\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


def _umoci_image(layout: Path, tag: str) -> str:
    return f"{layout}:{tag}"


def _write_tree(root: Path, files: dict[str, tuple[int, int, int, bytes | str | None]]) -> None:
    """files: path -> (mode, uid, gid, content; None for a directory; str: symlink target)."""
    for rel, (mode, uid, gid, content) in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        elif isinstance(content, str):
            path.symlink_to(content)
            continue
        else:
            path.write_bytes(content)
        os.chmod(path, mode)
        if (uid, gid) != (0, 0):        # umoci --rootless reads owners from this xattr
            os.setxattr(path, "user.rootlesscontainers", _rootless_owner(uid, gid))


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _rootless_owner(uid: int, gid: int) -> bytes:
    """The rootlesscontainers protobuf (uid = field 1, gid = field 2; zero fields omitted)."""
    return ((b"\x08" + _varint(uid) if uid else b"") + (b"\x10" + _varint(gid) if gid else b""))


def build_busybox_layout(workdir: Path, layout: Path, *, arch: str = "amd64", tag: str = "latest",
                         marker: str | None = None, whiteout: bool = True) -> None:
    """A busybox-static image in the OCI layout ``layout`` under ``tag`` (see module doc)."""
    busybox = Path("/bin/busybox")
    image = _new_image(layout, tag)
    src = Path(tempfile.mkdtemp(dir=workdir, prefix="src-"))
    files: dict[str, tuple[int, int, int, bytes | str | None]] = {
        "/bin": (0o755, 0, 0, None),
        "/bin/busybox": (0o755, 0, 0, busybox.read_bytes()),
        "/bin/sh": (0o777, 0, 0, "busybox"),
        "/bin/su-marker": (0o4755, 0, 0, b"setuid marker\n"),
        "/etc": (0o755, 0, 0, None),
        "/etc/passwd": (0o644, 0, 0, (b"root:x:0:0:root:/root:/bin/sh\n"
                                       b"app:x:1000:1000:app:/home/app:/bin/sh\n")),
        "/etc/group": (0o644, 0, 0, b"root:x:0:\napp:x:1000:\n"),
        "/etc/deleted-by-layer-2": (0o644, 0, 0, b"layer 2 deletes me\n"),
        "/etc/kept": (0o600, 0, 0, b"kept\n"),
        "/home": (0o755, 0, 0, None),
        "/home/app": (0o750, 1000, 1000, None),
        "/home/app/notes.txt": (0o640, 1000, 1001, b"owned by app\n"),
        "/tmp": (0o1777, 0, 0, None),
    }
    if marker is not None:
        files["/etc/platform"] = (0o644, 0, 0, marker.encode())
    _write_tree(src, files)
    os.link(src / "etc/kept", src / "etc/kept-hardlink")
    _run(["umoci", "insert", "--rootless", "--image", image, str(src), "/"])
    if whiteout:
        _run(["umoci", "insert", "--rootless", "--image", image, "--whiteout", "/etc/deleted-by-layer-2"])
    _umoci_config(image, BUSYBOX_CONFIG, arch)
    shutil.rmtree(src)


def python_rootfs_tar(cache_root: Path, progress=print) -> Path:
    """The mmdebstrap'd Python rootfs tarball, built once per machine into ``cache_root``
    (keyed by suite, packages and options; the apt sources are this machine's)."""
    key = hashlib.sha256(json.dumps([PYTHON_SUITE, PYTHON_PACKAGES, PYTHON_MMDEBSTRAP_ARGS])
                         .encode()).hexdigest()[:16]
    out = cache_root / f"python-rootfs-{key}.tar"
    if out.exists():
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp-{os.getpid()}.tar")   # mmdebstrap: format by suffix
    started = time.monotonic()
    progress(f"building the Python test image with mmdebstrap into {out} (once per machine)")
    mode = [] if os.geteuid() == 0 else ["--mode=unshare"]
    try:
        _run(["mmdebstrap", *mode, *PYTHON_MMDEBSTRAP_ARGS,
              "--include=" + ",".join(PYTHON_PACKAGES), PYTHON_SUITE, str(tmp)])
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    progress(f"built {out.name}: {out.stat().st_size / 2**20:.1f} MiB in "
             f"{time.monotonic() - started:.0f} s")
    return out


def _umoci_config(image: str, config: dict, arch: str = "amd64") -> None:
    argv = ["umoci", "config", "--image", image, "--os", "linux", "--architecture", arch,
            "--config.workingdir", config["working_dir"], "--config.user", config["user"]]
    for env in config["env"]:
        argv += ["--config.env", env]
    for part in config.get("entrypoint", ()):
        argv += ["--config.entrypoint", part]
    for part in config.get("cmd", ()):
        argv += ["--config.cmd", part]
    _run(argv)


def _insert_tree(workdir: Path, image: str, files: dict) -> None:
    """One more layer holding ``files`` (see ``_write_tree``)."""
    src = Path(tempfile.mkdtemp(dir=workdir, prefix="src-"))
    _write_tree(src, files)
    _run(["umoci", "insert", "--rootless", "--image", image, str(src), "/"])
    shutil.rmtree(src)


def _new_image(layout: Path, tag: str) -> str:
    if not layout.exists():
        _run(["umoci", "init", "--layout", str(layout)])
    image = _umoci_image(layout, tag)
    _run(["umoci", "new", "--image", image])
    return image


def build_python_layout(workdir: Path, layout: Path, tar: Path, tag: str = "latest") -> None:
    image = _new_image(layout, tag)
    _run(["umoci", "raw", "add-layer", "--image", image, str(tar)])
    # extract ran no maintainer scripts: no /etc/passwd (base-passwd's postinst writes it), no
    # /root, /proc, /sys; a second small layer adds them as a real image would have them
    _insert_tree(workdir, image, {**APP_TREE, "/srv/app/service.py":
                                  (0o644, 0, 0, SERVICE_PY.encode())})
    _umoci_config(image, PYTHON_CONFIG)


def build_toolless_layout(workdir: Path, layout: Path, tag: str = "latest") -> None:
    image = _new_image(layout, tag)
    _insert_tree(workdir, image, APP_TREE)
    _umoci_config(image, APP_CONFIG)


def push(registry: Registry, layout: Path, tag: str, name: str, dest_tag: str = "latest") -> None:
    _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
          *registry.skopeo_auth_args(), f"oci:{layout}:{tag}",
          f"docker://{registry.url}/{name}:{dest_tag}"])


def _registry_manifest(registry: Registry, name: str, tag: str) -> bytes:
    return _run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                 *registry.skopeo_auth_args("--creds"),
                 f"docker://{registry.url}/{name}:{tag}"]).encode()


def push_multi_platform(registry: Registry, workdir: Path, name: str = "multi") -> None:
    """An image index with linux/amd64 and linux/arm64 (each names itself in /etc/platform)."""
    layout = workdir / "multi-layout"
    entries = []
    for arch in ("arm64", "amd64"):         # amd64 second: the choice is not "the first one"
        build_busybox_layout(workdir, layout, arch=arch, tag=arch, marker=f"linux/{arch}\n",
                             whiteout=False)
        push(registry, layout, arch, name, dest_tag=f"only-{arch}")
        body = _registry_manifest(registry, name, f"only-{arch}")
        entries.append({
            "mediaType": json.loads(body).get("mediaType",
                                               "application/vnd.oci.image.manifest.v1+json"),
            "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
            "platform": {"architecture": arch, "os": "linux"}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": entries}
    registry.put_manifest(name, "latest", json.dumps(index).encode(),
                          "application/vnd.oci.image.index.v1+json")


TEST_IMAGES = ("busybox", "arm64only", "multi", "python", "toolless")


class TestImages:
    """Builds and pushes each test image to ``registry`` on first ``ref(name)``, so a test
    that needs only busybox does not pay for the Python image."""

    def __init__(self, registry: Registry, workdir: Path, *, cache_root: Path | None = None,
                 progress=print):
        self.registry, self.workdir = registry, workdir
        self.cache_root, self.progress = cache_root, progress
        self.pushed: set[str] = set()

    def ensure(self, name: str) -> None:
        if name in self.pushed:
            return
        if name not in TEST_IMAGES:
            raise KeyError(f"no test image {name!r}: one of {TEST_IMAGES}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        layout = self.workdir / "layout"
        if name == "busybox":
            build_busybox_layout(self.workdir, layout, tag="busybox")
            push(self.registry, layout, "busybox", "busybox")
        elif name == "arm64only":
            build_busybox_layout(self.workdir, layout, arch="arm64", tag="arm64only",
                                 whiteout=False)
            push(self.registry, layout, "arm64only", "arm64only")
        elif name == "multi":
            push_multi_platform(self.registry, self.workdir)
        elif name == "python":
            tar = python_rootfs_tar(self.cache_root or default_test_cache(), self.progress)
            build_python_layout(self.workdir, layout, tar, tag="python")
            push(self.registry, layout, "python", "python")
        elif name == "toolless":
            build_toolless_layout(self.workdir, layout, tag="toolless")
            push(self.registry, layout, "toolless", "toolless")
        self.pushed.add(name)


def default_test_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "supermachine-jupyter" / "test-images"
