"""The OCI puller (guest/oci.py) against a real registry on loopback, real skopeo, umoci and
e2fsprogs; the ext4 it writes is read back with debugfs (no mount, no VM)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from supermachine_jupyter.errors import ImageError, VmError
from supermachine_jupyter.guest.oci import ImageRef, OciError, pull

from .oci_registry import BUSYBOX_CONFIG, PYTHON_CONFIG, push

REPO = Path(__file__).resolve().parent.parent


# --- reading the ext4 image back -----------------------------------------------------------

def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True)
    return done.stdout


def ext4_ls(image: Path, directory: str) -> dict[str, tuple[int, int, int, int, int]]:
    """name -> (inode, mode, uid, gid, size) of ``debugfs ls -l``."""
    entries = {}
    for line in debugfs(image, f"ls -l {directory}").splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+\(\d+\)\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s+(.+)$",
                     line)
        if m:
            ino, mode, uid, gid, size, name = m.groups()
            entries[name] = (int(ino), int(mode, 8), int(uid), int(gid), int(size))
    assert entries, f"debugfs listed nothing in {directory}"
    return entries


def ext4_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True).stdout


def assert_cache_clean(cache: Path) -> None:
    """No build directory left behind, and every entry complete."""
    if not cache.exists():
        return
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"half-written build dirs left in the cache: {leftovers}"
    for entry in cache.glob("sha256-*"):
        assert sorted(p.name for p in entry.iterdir()) == ["image.json", "rootfs.ext4"], entry


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("sha256-*")) if cache.exists() else []


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "oci-cache"


@pytest.fixture
def clean_auth_env(tmp_path, monkeypatch):
    """Credentials only from what a test puts there: HOME and XDG_RUNTIME_DIR in tmp."""
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    return home


# --- content and config --------------------------------------------------------------------

def test_busybox_image_becomes_a_faithful_readonly_ext4(oci_registry, cache):
    lines: list[str] = []
    image = pull(oci_registry.ref("busybox"), tls_verify=False, cache_dir=cache,
                 progress=lines.append)
    assert image.ref == oci_registry.ref("busybox")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.digest)
    assert image.rootfs == cache / image.digest.replace(":", "-") / "rootfs.ext4"
    assert image.rootfs.stat().st_mode & 0o777 == 0o444
    # the config
    assert image.env == BUSYBOX_CONFIG["env"]
    assert image.working_dir == BUSYBOX_CONFIG["working_dir"]
    assert image.user == BUSYBOX_CONFIG["user"]
    assert image.entrypoint == BUSYBOX_CONFIG["entrypoint"]
    assert image.cmd == BUSYBOX_CONFIG["cmd"]
    # the file system: clean, and the tree as the layers say
    fsck = subprocess.run(["e2fsck", "-fn", str(image.rootfs)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    etc = ext4_ls(image.rootfs, "/etc")
    assert "deleted-by-layer-2" not in etc, "the whiteout of layer 2 was not applied"
    assert etc["kept"][0] == etc["kept-hardlink"][0], "the hard link became two files"
    assert etc["kept"][1:4] == (0o100600, 0, 0)
    home = ext4_ls(image.rootfs, "/home")
    assert home["app"][1:4] == (0o40750, 1000, 1000)
    app = ext4_ls(image.rootfs, "/home/app")
    assert app["notes.txt"][1:4] == (0o100640, 1000, 1001)
    bin_ = ext4_ls(image.rootfs, "/bin")
    assert bin_["su-marker"][1:4] == (0o104755, 0, 0), "setuid bit or owner lost"
    assert bin_["sh"][1] & 0o170000 == 0o120000
    assert ext4_ls(image.rootfs, "/")["tmp"][1] == 0o41777
    assert ext4_cat(image.rootfs, "/bin/busybox") == Path("/bin/busybox").read_bytes()
    assert ext4_cat(image.rootfs, "/home/app/notes.txt") == b"owned by app\n"
    # umoci's rootless owner records are ours, not the image's
    assert "rootlesscontainers" not in debugfs(image.rootfs, "ea_list /home/app/notes.txt")
    # progress: per layer with sizes, then unpack and convert
    layer_lines = [line for line in lines if re.search(r"layer \d/2 sha256:", line)]
    assert len(layer_lines) == 2, lines
    assert all(re.search(r"\(\d+\.\d (KiB|MiB)\)", line) for line in layer_lines), layer_lines
    assert any(line.endswith(": unpacking") for line in lines), lines
    assert any(re.search(r"converting to ext4 \(\d+ MiB\)", line) for line in lines), lines
    # nothing but rootfs.ext4 + image.json is kept
    assert_cache_clean(cache)
    assert entries(cache) == [image.digest.replace(":", "-")]
    meta = json.loads((image.rootfs.parent / "image.json").read_text())
    assert meta["digest"] == image.digest


def test_index_gives_the_linux_amd64_image(oci_registry, cache):
    ref = oci_registry.ref("multi")
    image = pull(ref, tls_verify=False, cache_dir=cache)
    assert ext4_cat(image.rootfs, "/etc/platform") == b"linux/amd64\n"
    index = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, check=True).stdout)
    amd64 = [m["digest"] for m in index["manifests"]
             if m["platform"]["architecture"] == "amd64"]
    assert image.digest == amd64[0]


def test_digest_reference(oci_registry, cache):
    first = pull(oci_registry.ref("busybox"), tls_verify=False, cache_dir=cache)
    by_digest = f"{oci_registry.url}/busybox@{first.digest}"
    second = pull(by_digest, tls_verify=False, cache_dir=cache, pull="always")
    assert (second.digest, second.rootfs) == (first.digest, first.rootfs)
    assert second.ref == by_digest
    before = len(oci_registry.requests())
    pinned = f"{oci_registry.url}/another-name@{first.digest}"   # pinned: the digest is enough
    assert pull(pinned, tls_verify=False, cache_dir=cache, pull="never").rootfs == first.rootfs
    assert oci_registry.requests()[before:] == []


# --- cache and pull policies ---------------------------------------------------------------

def test_second_pull_makes_no_registry_request(oci_registry, cache):
    ref = oci_registry.ref("busybox")
    first = pull(ref, tls_verify=False, cache_dir=cache)
    before, mtime = len(oci_registry.requests()), first.rootfs.stat().st_mtime_ns
    lines: list[str] = []
    second = pull(ref, tls_verify=False, cache_dir=cache, progress=lines.append)
    assert second == first
    assert oci_registry.requests()[before:] == [], "a cached pull talked to the registry"
    assert first.rootfs.stat().st_mtime_ns == mtime
    assert not any("converting" in line for line in lines)
    never = pull(ref, tls_verify=False, cache_dir=cache, pull="never")
    assert never == first
    assert oci_registry.requests()[before:] == []


def test_pull_never_with_an_empty_cache_is_a_clear_error(oci_registry, cache):
    ref = oci_registry.ref("busybox")
    before = len(oci_registry.requests())
    with pytest.raises(OciError, match=r"not in the cache .*pull='never'") as info:
        pull(ref, tls_verify=False, cache_dir=cache, pull="never")
    assert ref in str(info.value)
    assert oci_registry.requests()[before:] == []
    assert entries(cache) == []


def test_pull_always_follows_a_moved_tag_and_reuses_a_conversion(oci_registry, cache):
    reg = oci_registry
    reg.ref("busybox"), reg.ref("multi")      # build both layouts
    layouts = reg.images.workdir
    push(reg, layouts / "layout", "busybox", "moving")
    ref = reg.ref("moving")
    first = pull(ref, tls_verify=False, cache_dir=cache)

    before = len(reg.requests())
    again = pull(ref, tls_verify=False, cache_dir=cache, pull="always")
    asked = reg.requests()[before:]
    assert again == first
    assert any("/manifests/" in line for line in asked), "pull='always' did not ask"
    assert not any("/blobs/" in line for line in asked), "an unchanged digest was re-pulled"

    push(reg, layouts / "multi-layout", "amd64", "moving")        # the tag moves
    before = len(reg.requests())
    stale = pull(ref, tls_verify=False, cache_dir=cache)          # missing: what we have
    assert stale == first and reg.requests()[before:] == []
    moved = pull(ref, tls_verify=False, cache_dir=cache, pull="always")
    assert moved.digest != first.digest
    assert ext4_cat(moved.rootfs, "/etc/platform") == b"linux/amd64\n"
    assert pull(ref, tls_verify=False, cache_dir=cache, pull="never") == moved
    assert_cache_clean(cache)


def test_concurrent_pulls_of_one_image_convert_it_once(oci_registry, cache):
    ref = oci_registry.ref("python")
    code = textwrap.dedent(f"""
        from supermachine_jupyter.guest.oci import pull
        image = pull({ref!r}, tls_verify=False, cache_dir={str(cache)!r},
                     progress=lambda line: print(line, flush=True))
        print("DIGEST", image.digest, image.rootfs)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = {line for out in outputs for line in out.splitlines() if line.startswith("DIGEST")}
    assert len(results) == 1, outputs
    conversions = sum(out.count("converting to ext4") for out in outputs)
    assert conversions == 1, outputs
    reused = sum(("already converted" in out) or (": cached" in out) for out in outputs)
    assert reused == 1, outputs
    assert_cache_clean(cache)


# --- auth ----------------------------------------------------------------------------------

def test_auth_refused_without_credentials(oci_auth_registry, cache, clean_auth_env):
    ref = oci_auth_registry.ref("busybox")
    with pytest.raises(OciError, match="refused access") as info:
        pull(ref, tls_verify=False, cache_dir=cache)
    assert ref in str(info.value) and "auth_file" in str(info.value)
    assert entries(cache) == []


def test_auth_refused_with_a_wrong_password(oci_auth_registry, cache, clean_auth_env, tmp_path):
    ref = oci_auth_registry.ref("busybox")
    bad = oci_auth_registry.write_authfile(tmp_path / "bad.json", password="wrong")
    with pytest.raises(OciError, match="refused access"):
        pull(ref, tls_verify=False, cache_dir=cache, auth_file=bad)
    assert entries(cache) == []


def test_auth_accepted_from_an_authfile(oci_auth_registry, cache, clean_auth_env, tmp_path):
    good = oci_auth_registry.write_authfile(tmp_path / "auth.json")
    image = pull(oci_auth_registry.ref("busybox"), tls_verify=False, cache_dir=cache,
                 auth_file=good)
    assert ext4_ls(image.rootfs, "/home")["app"][2] == 1000


@pytest.mark.parametrize("where", ["docker-config", "containers-auth"])
def test_auth_found_by_skopeos_own_lookup(oci_auth_registry, cache, clean_auth_env, where):
    path = (clean_auth_env / ".docker" / "config.json" if where == "docker-config"
            else clean_auth_env / "run" / "containers" / "auth.json")
    path.parent.mkdir(parents=True)
    oci_auth_registry.write_authfile(path)
    image = pull(oci_auth_registry.ref("busybox"), tls_verify=False, cache_dir=cache)
    assert image.rootfs.is_file()


def test_missing_auth_file_is_named(oci_registry, cache, tmp_path):
    with pytest.raises(OciError, match=r"auth file .*nope\.json.* does not exist"):
        pull(oci_registry.ref("busybox"), tls_verify=False, cache_dir=cache,
             auth_file=tmp_path / "nope.json")


# --- errors --------------------------------------------------------------------------------

def test_errors_are_image_errors():
    # ImageError: what %%vm --image turns into a one-line message in the cell
    assert issubclass(OciError, ImageError) and issubclass(OciError, VmError)


@pytest.mark.parametrize("ref", ["-rf", "--authfile=/etc/passwd", "", "Upper/case:1",
                                 "a b", "name:bad tag", "x@sha256:zz", "x:1:2", "/abs"])
def test_bad_reference_syntax(ref, cache):
    with pytest.raises(OciError, match="image reference") as info:
        pull(ref, tls_verify=False, cache_dir=cache)
    assert repr(ref) in str(info.value)
    assert not cache.exists()


@pytest.mark.parametrize("ref,name,tag,digest", [
    ("python:3.12-slim", "python", "3.12-slim", None),
    ("alpine", "alpine", None, None),
    ("localhost:5000/a/b-c_d.e:v1.0", "localhost:5000/a/b-c_d.e", "v1.0", None),
    ("[::1]:5000/app@sha256:" + "a" * 64, "[::1]:5000/app", None, "sha256:" + "a" * 64),
    ("Registry.Example/x:T", "Registry.Example/x", "T", None),
])
def test_reference_syntax_accepted(ref, name, tag, digest):
    parsed = ImageRef.parse(ref)
    assert (parsed.name, parsed.tag, parsed.digest) == (name, tag, digest)


def test_bad_pull_policy(oci_registry, cache):
    with pytest.raises(OciError, match="pull='sometimes'.*missing, always, never"):
        pull(oci_registry.ref("busybox"), pull="sometimes", cache_dir=cache)


@pytest.mark.parametrize("what", ["tag", "repository"])
def test_unknown_image_or_tag(oci_registry, cache, what):
    ref = (oci_registry.ref("busybox", tag="no-such-tag") if what == "tag"
           else oci_registry.ref("no-such-image"))
    with pytest.raises(OciError, match="not found") as info:
        pull(ref, tls_verify=False, cache_dir=cache)
    assert ref in str(info.value)
    assert_cache_clean(cache)
    assert entries(cache) == []


def test_no_linux_amd64_variant(oci_registry, cache):
    ref = oci_registry.ref("arm64only")
    with pytest.raises(OciError, match="no linux/amd64 variant") as info:
        pull(ref, tls_verify=False, cache_dir=cache)
    assert ref in str(info.value) and "linux/arm64" in str(info.value)
    assert_cache_clean(cache)
    assert entries(cache) == []


def test_index_without_linux_amd64(oci_registry, cache):
    reg = oci_registry
    reg.ref("multi")
    body = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{reg.url}/multi:only-arm64"],
                          capture_output=True, check=True).stdout
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                            "size": len(body),
                            "platform": {"architecture": "arm64", "os": "linux"}}]}
    reg.put_manifest("multi", "arm-index", json.dumps(index).encode(),
                     "application/vnd.oci.image.index.v1+json")
    before = len(reg.requests())
    with pytest.raises(OciError, match=r"no linux/amd64 variant \(it offers: linux/arm64\)"):
        pull(reg.ref("multi", tag="arm-index"), tls_verify=False, cache_dir=cache)
    assert not any("/blobs/" in line for line in reg.requests()[before:])
    assert entries(cache) == []


def test_registry_unreachable(cache):
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref = f"127.0.0.1:{port}/busybox:latest"
    with pytest.raises(OciError, match="unreachable") as info:
        pull(ref, tls_verify=False, cache_dir=cache)
    assert ref in str(info.value)
    assert entries(cache) == []


def test_plain_http_registry_says_tls_verify(oci_registry, cache, monkeypatch):
    monkeypatch.delenv("SUPERMACHINE_OCI_TLS_VERIFY", raising=False)
    with pytest.raises(OciError, match="tls_verify=False.*SUPERMACHINE_OCI_TLS_VERIFY=0"):
        pull(oci_registry.ref("busybox"), cache_dir=cache)
    monkeypatch.setenv("SUPERMACHINE_OCI_TLS_VERIFY", "0")
    assert pull(oci_registry.ref("busybox"), cache_dir=cache).rootfs.is_file()


def test_short_name_goes_to_docker_hub(cache, clean_auth_env):
    """A name without a registry is docker.io/library/NAME (skopeo's docker:// rule); docker.io
    is unreachable from this machine, which the error says."""
    with pytest.raises(OciError, match="unreachable") as info:
        pull("busybox:latest", cache_dir=cache)
    assert "registry-1.docker.io" in str(info.value) or "docker.io" in str(info.value)


PULL_IN_CHILD = """
import json, os, sys
from supermachine_jupyter.guest.oci import pull, OciError
try:
    image = pull(sys.argv[1], tls_verify=False, cache_dir=sys.argv[2])
    result = {"ok": str(image.rootfs)}
except OciError as exc:
    result = {"error": str(exc)}
result["files"] = sorted(os.path.relpath(os.path.join(d, f), sys.argv[2])
                         for d, _, fs in os.walk(sys.argv[2]) for f in fs)
result["dirs"] = sorted(os.path.relpath(d, sys.argv[2]) for d, _, _ in os.walk(sys.argv[2]))
print(json.dumps(result))
"""


@pytest.mark.parametrize("size,stage", [("2m", "unpack"), ("3m", "mkfs.ext4")])
def test_disk_full_while_converting(oci_registry, tmp_path, size, stage):
    """A cache on a tiny tmpfs (mounted in a private mount namespace: as root with
    `unshare -m`, else in a user namespace with `unshare -rm`)."""
    ref = oci_registry.ref("busybox")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    probe = subprocess.run([*unshare, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a small file system for the cache here: {' '.join(unshare)} "
                    f"failed ({probe.stderr.strip()}); needs root or unprivileged user "
                    "namespaces")
    done = subprocess.run(
        [*unshare, "sh", "-c", 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"',
         "sh", size, str(tiny), sys.executable, "-c", PULL_IN_CHILD, ref, str(tiny / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert "error" in result, f"the pull fit into {size}: {result}"
    message = result["error"]
    assert "disk is full" in message and ref in message, message
    assert str(tiny / "cache") in message and "SUPERMACHINE_OCI_CACHE" in message, message
    assert stage in message or stage.split(".")[0] in message, message
    assert not [f for f in result["files"] if not f.startswith(".")], result   # only lock files
    assert result["dirs"] == ["."], result                                      # no entry, no tmp


# --- interrupts ----------------------------------------------------------------------------

def _start_python_pull(ref: str, cache: Path, hold_at: str) -> subprocess.Popen:
    """A pull in a child process that stops for a minute in the progress line holding
    ``hold_at``, so the test's signal lands in that stage however fast the machine is."""
    code = textwrap.dedent(f"""
        import time
        from supermachine_jupyter.guest.oci import pull
        def progress(line):
            print(line, flush=True)
            if {hold_at!r} in line:
                time.sleep(60)
        pull({ref!r}, tls_verify=False, cache_dir={str(cache)!r}, progress=progress)
        print("DONE", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, word: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if word in line:
            return seen
    raise AssertionError(f"the pull ended before {word!r}: {''.join(seen)}")


@pytest.mark.parametrize("stage", ["layer", "unpacking", "converting"])
def test_interrupt_leaves_no_cache_entry(oci_registry, cache, stage):
    ref = oci_registry.ref("python")
    proc = _start_python_pull(ref, cache, stage)
    _wait_for(proc, stage)
    os.killpg(proc.pid, signal.SIGINT)               # what Jupyter's interrupt does
    rest = proc.communicate(timeout=60)[0]
    assert "DONE" not in rest, f"the pull finished before the interrupt: {rest}"
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in rest, rest
    assert_cache_clean(cache)
    assert entries(cache) == []


def test_killed_pull_leaves_no_entry_and_is_swept(oci_registry, cache):
    ref = oci_registry.ref("python")
    proc = _start_python_pull(ref, cache, "unpacking")
    _wait_for(proc, "unpacking")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    time.sleep(0.2)
    assert entries(cache) == []
    assert [p for p in cache.iterdir() if p.name.startswith(".tmp-")], \
        "SIGKILL left no build dir: the test did not kill mid-build"
    image = pull(ref, tls_verify=False, cache_dir=cache)       # sweeps the dead one's dir
    assert_cache_clean(cache)
    assert image.rootfs.is_file()


# --- ownership without root ----------------------------------------------------------------

def test_conversion_as_a_non_root_user_keeps_the_images_owners(oci_registry):
    """Without root, umoci --rootless writes every file as the caller: the ext4 must still
    carry the image's owners (debugfs fixes them from umoci's xattrs)."""
    if os.geteuid() != 0:
        pytest.skip("running as non-root already: every other test here covers this case")
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.fail("needs /usr/bin/python3 to run the puller as nobody (the venv's python "
                    "may live where nobody cannot read)")
    work = Path(tempfile.mkdtemp(prefix="oci-nobody-"))
    try:
        os.chown(work, 65534, 65534)
        site = subprocess.run([sys.executable, "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python]
        env = {**os.environ, "HOME": str(work), "XDG_RUNTIME_DIR": str(work),
               "PYTHONPATH": f"{REPO}:{site}"}
        probe = subprocess.run([*as_nobody, "-c", "import supermachine_jupyter.guest.oci"],
                               env=env, cwd=work, capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            pytest.skip("user nobody cannot import the package from this checkout and venv "
                        f"({REPO}, {site}), so the non-root conversion cannot run here: "
                        f"{probe.stderr.strip().splitlines()[-1:]}")
        done = subprocess.run(
            [*as_nobody, "-c", PULL_IN_CHILD, oci_registry.ref("busybox"), str(work / "cache")],
            env=env, cwd=work, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert "ok" in result, result
        rootfs = Path(result["ok"])
        assert rootfs.stat().st_uid == 65534               # really written by nobody
        assert ext4_ls(rootfs, "/home")["app"][1:4] == (0o40750, 1000, 1000)
        assert ext4_ls(rootfs, "/home/app")["notes.txt"][1:4] == (0o100640, 1000, 1001)
        assert ext4_ls(rootfs, "/bin")["su-marker"][1:4] == (0o104755, 0, 0)
        assert ext4_ls(rootfs, "/bin")["sh"][2:4] == (0, 0)
        assert ext4_ls(rootfs, "/")["etc"][2:4] == (0, 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the Python image ----------------------------------------------------------------------

def test_python_image(oci_registry, cache):
    image = pull(oci_registry.ref("python"), tls_verify=False, cache_dir=cache)
    assert (image.entrypoint, image.cmd) == (PYTHON_CONFIG["entrypoint"], PYTHON_CONFIG["cmd"])
    assert image.env == PYTHON_CONFIG["env"] and image.user == PYTHON_CONFIG["user"]
    usr_bin = ext4_ls(image.rootfs, "/usr/bin")
    assert "python3" in usr_bin
    assert ext4_cat(image.rootfs, "/usr/lib/python3.11/os.py").startswith(b'r"""OS routines')
    assert ext4_cat(image.rootfs, "/etc/passwd").startswith(b"root:x:0:0:")
    assert ext4_ls(image.rootfs, "/")["root"][1] == 0o40700


def test_registries_conf_mirror_serves_a_short_name(oci_registry, cache, tmp_path, monkeypatch):
    """`busybox:latest` is docker.io/library/busybox; a registries.conf mirror for docker.io
    (here: the loopback registry) is where skopeo fetches it from."""
    reg = oci_registry
    reg.ref("busybox")
    push(reg, reg.images.workdir / "layout", "busybox", "library/busybox", dest_tag="mirrored")
    conf = tmp_path / "registries.conf"
    conf.write_text(textwrap.dedent(f"""
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "{reg.url}"
        insecure = true
    """))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    monkeypatch.delenv("SUPERMACHINE_OCI_TLS_VERIFY", raising=False)
    before = len(reg.requests())
    image = pull("busybox:mirrored", cache_dir=cache)
    assert any("/v2/library/busybox/manifests/" in line for line in reg.requests()[before:])
    assert ext4_cat(image.rootfs, "/home/app/notes.txt") == b"owned by app\n"
    assert image.ref == "busybox:mirrored"
