"""OCI images as VMs, end to end (issue L): test images built from Debian packages by
tests/oci_registry.py, pushed to a docker-registry on loopback, pulled by ``Image.from_oci`` /
``%%vm --image`` / ``run --image`` and booted on QEMU/TCG: the image read-only under a per-VM
writable layer, its config (Env, WorkingDir, User, Entrypoint + Cmd) honoured, volumes and
mounts inside it, a service with its data on a volume, one pre-booted snapshot per image
digest, and ``%%vm --image REF python3`` cells, errors included.

The module pulls into a cache of its own (``SUPERMACHINE_OCI_CACHE``; plain HTTP to the
loopback registry with ``SUPERMACHINE_OCI_TLS_VERIFY=0``), so each image is converted once per
run; the pull's own cases (content, policies, auth, disk full, interrupts) are in
test_oci_pull.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from supermachine_jupyter.config import MountSpec, VmConfig, VolumeSpec
from supermachine_jupyter.devices.rootfs import GUEST_BUSYBOX
from supermachine_jupyter.errors import ImageError, SnapshotError, VmError
from supermachine_jupyter.image import Image
from supermachine_jupyter.snapshots import cache, store

from .oci_registry import APP_CONFIG, SERVICE_DATA_DIR

if shutil.which("qemu-system-x86_64") is None:
    pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
QEMU = VmConfig(engine="qemu")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lines(result) -> list[str]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.splitlines()


def py(code: str) -> list[str]:
    """argv running ``code`` with the image's python3 (the image has no coreutils)."""
    return ["python3", "-c", code]


@pytest.fixture(scope="module")
def oci_cache(tmp_path_factory):
    """This module's image cache, and the environment the magic and the CLI pull with."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("oci-cache")
    patch.setenv("SUPERMACHINE_OCI_CACHE", str(path))
    patch.setenv("SUPERMACHINE_OCI_TLS_VERIFY", "0")
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def py_image(oci_registry, oci_cache):
    """``Image.from_oci`` of the Python test image, twice: the first pulls and converts it,
    the second must come from the cache (``.second_pull_requests``: what the registry served
    it); the VMs here boot the second."""
    ref = oci_registry.ref("python")
    Image.from_oci(ref, tls_verify=False)
    before = len(oci_registry.requests())
    image = Image.from_oci(ref, tls_verify=False)
    return types.SimpleNamespace(ref=ref, image=image,
                                 second_pull_requests=oci_registry.requests()[before:])


@pytest.fixture(scope="module")
def busybox_image(oci_registry, oci_cache):
    return Image.from_oci(oci_registry.ref("busybox"), tls_verify=False)


@pytest.fixture(scope="module")
def image_vm(py_image, tmp_path_factory):
    """One VM of the Python image with a volume and a virtio-fs mount, shared by the tests
    that only look at it or write where nothing else looks."""
    tmp = tmp_path_factory.mktemp("oci")
    share = tmp / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("host says hi\n")
    config = VmConfig(engine="qemu", volumes=[VolumeSpec(str(tmp / "data.img"), "/data")],
                      mounts=[MountSpec(str(share), "share", "/mnt/share")])
    rootfs = py_image.image.rootfs.rootfs
    before = sha256(rootfs), rootfs.stat().st_mtime_ns
    vm = py_image.image.start(config, name="oci-py")
    yield types.SimpleNamespace(vm=vm, share=share, before=before, rootfs=rootfs)
    vm.stop(timeout=5)


def test_python_runs_in_the_image_pulled_from_the_cache(image_vm, py_image):
    assert py_image.second_pull_requests == [], "the second from_oci talked to the registry"
    out = lines(image_vm.vm.run("python3 -c 'import sys; print(sys.version)'"))
    assert out[0].startswith("3.11."), out
    assert f"image={py_image.ref}@sha256:" in repr(image_vm.vm)


def test_image_env_workdir_and_user_are_the_defaults(image_vm):
    out = lines(image_vm.vm.run(argv=py(
        "import os; print(os.getuid(), os.getgid(), sorted(os.getgroups()), os.getcwd(), "
        "os.environ['GREETING'], os.environ['HOME'], sep='\\n')")))
    assert out == ["1000", "1000", "[50, 1000]", APP_CONFIG["working_dir"],
                   "hello from the image", "/home/alice"]      # staff: alice's extra group


def test_caller_overrides_the_image_config(image_vm):
    ids = py("import os; print(os.getuid(), os.getgid(), os.getcwd(), "
             "os.environ['GREETING'])")
    out = lines(image_vm.vm.run(argv=ids, user="root", cwd="/tmp", env={"GREETING": "mine"}))
    assert out == ["0 0 /tmp mine"]
    assert lines(image_vm.vm.run(argv=ids, user="4242"))[0].startswith("4242 0 ")  # no passwd
    assert lines(image_vm.vm.run(argv=ids, user="alice:staff"))[0].startswith("1000 50 ")


def test_unknown_user_or_group_is_a_clear_error(image_vm):
    with pytest.raises(VmError, match="user 'mallory' not found in the image's /etc/passwd"):
        image_vm.vm.run("true", user="mallory")
    with pytest.raises(VmError, match="group 'wheel' .*not found in the image's /etc/group"):
        image_vm.vm.run("true", user="alice:wheel")
    assert image_vm.vm.run("echo still fine").stdout == "still fine\n"


def test_writes_to_root_stay_in_the_vm_and_never_reach_the_image_file(image_vm):
    out = lines(image_vm.vm.run(argv=py(
        "import os; open('/etc/scribble', 'w').write('scribble'); os.remove('/srv/app/README');"
        " os.sync(); print(open('/etc/scribble').read(), os.listdir('/srv/app'))"),
        user="root"))
    assert out == ["scribble ['service.py']"]
    assert image_vm.before == (sha256(image_vm.rootfs), image_vm.rootfs.stat().st_mtime_ns)


def test_agent_lives_in_a_read_only_hidden_dir(image_vm):
    result = image_vm.vm.run(argv=[GUEST_BUSYBOX, "sh", "-c",
                                   "ls /.supermachine; touch /.supermachine/x"], user="root")
    assert "supermachine-agent" in result.stdout and "busybox" in result.stdout
    assert result.exit_code != 0 and "Read-only file system" in result.stderr


def test_volumes_and_mounts_inside_the_image(image_vm):
    out = lines(image_vm.vm.run(argv=py(
        "print(open('/mnt/share/from-host.txt').read(), end=''); "
        "open('/data/x', 'w').write('vol'); print(open('/data/x').read()); "
        "open('/mnt/share/from-guest.txt', 'w').write('back')"), user="root"))
    assert out == ["host says hi", "vol"]
    assert (image_vm.share / "from-guest.txt").read_text() == "back"
    assert [v["guest_path"] for v in image_vm.vm.volumes()] == ["/data"]


def test_image_service_runs_with_its_data_on_a_volume(py_image, tmp_path):
    """The seed's service example: the image's Entrypoint + Cmd (a Python service that counts
    its starts and beats a heartbeat in its data dir) run by ``run_image_command`` with a
    volume at that data dir; the data outlives the VM."""
    config = VmConfig(engine="qemu",
                      volumes=[VolumeSpec(str(tmp_path / "app-data.img"), SERVICE_DATA_DIR)])
    for start in (1, 2):
        with py_image.image.start(config, name=f"svc{start}") as vm:
            if start == 1:          # a new volume is root's: the service runs as alice
                vm.run(argv=py(f"import os; os.chown({SERVICE_DATA_DIR!r}, 1000, 1000)"),
                       user="root")
            service = vm.run_image_command()
            first = service.next_event(timeout=60)     # start 2: the volume kept start 1
            assert first.data.decode() == f"service up as 1000 in /srv/app start {start}\n"
            beat = py(f"print(open('{SERVICE_DATA_DIR}/heartbeat').read())")
            deadline, heartbeat = time.monotonic() + 30, ""
            while time.monotonic() < deadline:      # this start's beats, not the last VM's
                heartbeat = lines(vm.run(argv=beat))[0]
                if heartbeat.startswith(f"{start} ") and int(heartbeat.split()[1]) >= 3:
                    break
                time.sleep(0.2)
            assert service.exit is None and heartbeat.startswith(f"{start} "), heartbeat
            assert int(heartbeat.split()[1]) >= 3, f"the service stopped beating: {heartbeat}"
            assert (vm.read_file("/tmp/image-command.log").decode()
                    == f"service up as 1000 in /srv/app start {start}\n")


def test_missing_or_damaged_rootfs_is_a_clear_error(busybox_image, tmp_path):
    gone = dataclasses.replace(busybox_image.rootfs, rootfs=tmp_path / "gone.ext4")
    with pytest.raises(ImageError, match=rf"{re.escape(gone.ref)} .*gone\.ext4 does not exist"):
        Image.from_rootfs(gone).start(QEMU)
    junk = tmp_path / "junk.ext4"
    junk.write_bytes(b"\0" * 65536)
    with pytest.raises(ImageError, match="holds no ext4 file system"):
        Image.from_rootfs(dataclasses.replace(gone, rootfs=junk)).start(QEMU)


def test_corrupt_ext4_fails_the_boot_saying_so(busybox_image, tmp_path):
    # The superblock is intact (the host's check passes) but the file system is cut short:
    # the guest's init cannot mount it and says which disk and what to do.
    broken = tmp_path / "broken.ext4"
    with open(busybox_image.rootfs.rootfs, "rb") as f:
        broken.write_bytes(f.read(2 * 1024 * 1024))
    image = Image.from_rootfs(dataclasses.replace(busybox_image.rootfs, rootfs=broken))
    with pytest.raises(VmError, match="cannot mount the image's root file system .*pull the "
                                      "image again"):
        image.start(QEMU, boot_timeout=60)


def test_second_start_restores_the_per_digest_snapshot(oci_registry, oci_cache, tmp_path,
                                                       monkeypatch):
    """The pre-booted snapshot of an image references its rootfs file (never copies it), a
    restore gets a fresh writable layer and is made the guest's own (hostname, clock) even in
    an image without a single program, and a restore whose rootfs file is gone is refused
    naming it."""
    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path / "snaps")
    (tmp_path / "snaps").mkdir()
    pulled = Image.from_oci(oci_registry.ref("toolless"))
    copy = tmp_path / "toolless.ext4"              # a copy: the test deletes it at the end
    shutil.copyfile(pulled.rootfs.rootfs, copy)
    image = Image.from_rootfs(dataclasses.replace(pulled.rootfs, rootfs=copy))
    sh = [GUEST_BUSYBOX, "sh", "-c"]       # the image has no shell: the initramfs's busybox
    with image.start(QEMU, name="first", snapshot_cache=True) as first:
        assert first.restored_from is None
        assert first.run(argv=[*sh, "echo mine > /etc/mark"], user="root").exit_code == 0
        with pytest.raises(VmError, match="exec /bin/sh: No such file or directory"):
            first.run("true")                # really no shell in it
    assert cache.wait_for_background(timeout=60)
    with image.start(QEMU, name="second", snapshot_cache=True) as second:
        assert second.restored_from is not None
        assert "restored_from=" in repr(second)
        out = lines(second.run(argv=[*sh, "cat /etc/mark 2>&1; id -un; pwd; hostname"]))
        assert out[0].endswith("No such file or directory") and out[1:] == [
            "alice", "/srv/app", "second"]
    snapshot_dir = second.restored_from
    # The snapshot holds guest RAM and state, not the image's disk: it names the file.
    from supermachine_jupyter.snapshots.format import Snapshot
    header = Snapshot.open(snapshot_dir).header
    assert header["volumes"] == [] and header["rootfs"]["rootfs"] == str(copy)
    assert header["rootfs"]["digest"] == image.rootfs.digest
    assert not any(f.name.startswith("volume") for f in snapshot_dir.iterdir())
    copy.unlink()
    with pytest.raises(SnapshotError, match=r"toolless\.ext4 does not exist"):
        Image.from_snapshot(snapshot_dir).start(VmConfig())


# --- %%vm --image and run --image ----------------------------------------------------------

@pytest.fixture
def ip(oci_cache, monkeypatch, tmp_path):
    """An IPython shell with the magics, pre-booted snapshots in ``tmp_path``, pulling from
    the loopback registry into this module's cache."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    monkeypatch.setattr(store, "snapshots_dir", lambda: tmp_path)
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "supermachine_jupyter")
    yield shell
    shell.run_line_magic("vm", "stop --all")


class TimedStdout:
    """A stdout that notes when each piece of output arrived."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def when(self, text: str) -> float:
        """When the output so far first held ``text``."""
        so_far = ""
        for at, written in self.writes:
            so_far += written
            if text in so_far:
                return at
        raise AssertionError(f"{text!r} never came: {so_far!r}")

    @property
    def text(self) -> str:
        return "".join(written for _, written in self.writes)


def test_vm_image_cells_stream_restore_and_keep_named_vms(ip, py_image, oci_registry, capsys):
    from contextlib import redirect_stdout
    ref = py_image.ref
    before = len(oci_registry.requests())
    clock = TimedStdout()
    with redirect_stdout(clock):
        # plain python3: cells stream without -u (PYTHONUNBUFFERED)
        ip.run_cell_magic("vm", f"--image {ref} --engine qemu python3",
                          "import os, sys, time\n"
                          "print('py', sys.version_info[0], os.getcwd(), os.getuid())\n"
                          "time.sleep(2)\nprint('done')\n")
    assert "py 3 /srv/app 1000\n" in clock.text and "VM booted in" in clock.text, clock.text
    assert clock.when("done") - clock.when("py 3 /srv/app") >= 1.5, "the cell's output did not stream"
    assert cache.wait_for_background(timeout=60)
    ip.run_cell_magic("vm", f"--image {ref} --engine qemu", "echo restored cell; echo \"$HOME\"")
    out = capsys.readouterr().out
    assert "restored cell\n/home/alice\n" in out and re.search(r"VM restored in \d", out), out
    # A named image VM keeps its files across cells; later cells need not repeat --image.
    ip.run_cell_magic("vm", f"--name keep1 --image {ref} --engine qemu --quiet python3",
                      "open('/home/alice/note', 'w').write('kept across cells')\n")
    ip.run_cell_magic("vm", "--name keep1 python3", "print(open('/home/alice/note').read())\n")
    assert "kept across cells" in capsys.readouterr().out
    assert f"image    {ref} (sha256:" in repr(ip.run_line_magic("vm", "info keep1"))
    assert oci_registry.requests()[before:] == [], "a cell pulled an image already cached"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case,options,cause", [
    ("unknown tag", "--image {reg}/python:no-such-tag", "not found"),
    ("unknown image", "--image {reg}/no-such-image:latest", "not found"),
    ("no linux/amd64", "--image {reg}/arm64only:latest", "no linux/amd64 variant"),
    ("unreachable", "--image 127.0.0.1:{closed}/python:latest", "unreachable"),
    ("auth refused", "--image {auth}/busybox:latest", "refused access"),
    ("not cached", "--image {reg}/never-pulled:latest --pull never", "not in the cache"),
    ("bad reference", "--image Upper/Case", "image reference"),
])
def test_vm_image_errors_are_one_line_in_the_cell(ip, oci_registry, oci_auth_registry,
                                                   tmp_path, monkeypatch, capsys, case,
                                                   options, cause):
    """Each way an image cannot be had is one clear line under the cell (IPython's
    UsageError), naming the image and the cause, not a traceback."""
    monkeypatch.setenv("HOME", str(tmp_path))                 # no credentials of the host's
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    oci_registry.ref("arm64only")
    oci_auth_registry.ref("busybox")
    options = options.format(reg=oci_registry.url, auth=oci_auth_registry.url,
                             closed=_closed_port())
    result = ip.run_cell(f"%%vm {options}\ntrue\n")
    err = capsys.readouterr().err
    assert type(result.error_in_exec).__name__ == "UsageError", (case, result.error_in_exec)
    message = str(result.error_in_exec)
    assert "\n" not in message and cause in message, message
    assert message.startswith(f"--image {options.split()[1]}: "), message
    assert "Traceback" not in err and err.strip() == f"UsageError: {message}", err


def test_cli_run_image_with_an_interpreter_and_a_one_line_error(py_image, oci_registry, oci_cache):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supermachine_jupyter", "run", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=180,
                              check=False, env=os.environ.copy())
    done = cli("--image", py_image.ref, "--fresh", "--engine", "qemu", "--interpreter",
               "python3", "import os; print(os.getcwd(), os.environ['GREETING'])")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/srv/app hello from the image\n"
    missing = f"{oci_registry.url}/python:no-such-tag"
    done = cli("--quiet", "--image", missing, "true")
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(rf"error: image '{re.escape(missing)}'.*not found.*\n", done.stderr), \
        done.stderr


# --- what a snapshot and a repr keep of an image -------------------------------------------

def test_image_repr_names_ref_and_short_digest(busybox_image):
    digest = busybox_image.rootfs.digest
    assert repr(busybox_image).startswith(
        f"Image(oci={busybox_image.rootfs.ref!r}, digest={digest[:19]},")
    assert digest[19:] not in repr(busybox_image)


def test_snapshot_record_of_the_rootfs_checks_the_very_file(busybox_image, tmp_path):
    """What a snapshot keeps of an image's disk: a record naming the file, refused at
    restore when the file is another file system now (made again: new UUID) or malformed."""
    from supermachine_jupyter.devices import rootfs
    copy = tmp_path / "image.ext4"
    shutil.copyfile(busybox_image.rootfs.rootfs, copy)
    image = dataclasses.replace(busybox_image.rootfs, rootfs=copy)
    record = rootfs.to_record(image)
    assert rootfs.check_record(record) is None
    assert rootfs.from_record(record, "snap") == image
    with open(copy, "r+b") as f:          # the ext4 UUID, as another mkfs run would make it
        f.seek(1024 + 0x68)
        f.write(b"\x42" * 16)
    with pytest.raises(ImageError, match="has changed since .*make the snapshot again"):
        rootfs.from_record(record, "snap")
    assert "rootfs.env" in rootfs.check_record({**record, "env": "PATH=/bin"})
    assert "rootfs.size" in rootfs.check_record({**record, "size": True})
