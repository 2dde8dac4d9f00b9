"""Taking a snapshot of a running VM: the guest pauses while the engine saves its state and
the volumes are copied, then runs on while the files are finished (``begin_snapshot``)."""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import rootfs
from ..devices.volumes import VolumeError
from ..errors import EngineError
from .format import (
    FORMAT_VERSION,
    HEADER_FILE,
    Progress,
    Snapshot,
    SnapshotError,
    SnapshotNotSupportedError,
    _silent,
    asset_sha256,
    content_digest,
    encode_header,
    file_sha256,
)

if TYPE_CHECKING:
    from ..vm import Vm


def write_snapshot(vm: Vm, path: str | os.PathLike, overwrite: bool = False,
                   progress: Progress = _silent) -> Snapshot:
    """What ``Vm.snapshot`` does. The directory appears complete or not at all."""
    return begin_snapshot(vm, path, overwrite, progress)()


def begin_snapshot(vm: Vm, path: str | os.PathLike, overwrite: bool = False,
                   progress: Progress = _silent) -> Callable[[], Snapshot]:
    """Take the snapshot now (the guest pauses and resumes before this returns) and return
    the function that finishes writing it; that one may run in another thread while the VM
    goes on, and returns the :class:`Snapshot`."""
    path = Path(path).expanduser().absolute()
    spec, instance = vm._spec, vm.instance
    if path.exists() and not overwrite:
        raise SnapshotError(f"snapshot: {path} already exists (pass overwrite=True to "
                            "replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))

    # The data volumes are copied; an OCI image's root file system (read-only, the last
    # volume) is not: the header records which file it is (devices/rootfs.py).
    def copy_volumes() -> None:
        for i in range(len(spec.data_volumes)):
            instance.copy_volume(i, tmp / f"volume{i}.img")

    progress(f"saving {vm.name} to {path}…")
    created = time.time()
    try:
        finish_engine = instance.snapshot_to(tmp, while_paused=copy_volumes)
    except NotImplementedError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotNotSupportedError(f"snapshot: {exc}") from exc
    except (EngineError, VolumeError, TimeoutError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"snapshot of VM {vm.name!r} failed: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Everything the header needs from the VM, as it was when the guest was paused.
    header = {
        "format_version": FORMAT_VERSION,
        "engine": vm.engine,
        "created_at": datetime.datetime.fromtimestamp(created, datetime.UTC)
                                      .isoformat(timespec="seconds"),
        "created_unix": created,
        "source_vm": vm.name,
        "config": spec.config.to_dict(),
        "memory_mib": spec.memory_mib,
        "vcpus": spec.vcpus,
        "kernel": str(spec.kernel),
        "kernel_sha256": asset_sha256(spec.kernel),
        "initrd": str(spec.initrd),
        "initrd_sha256": asset_sha256(spec.initrd),
        "cmdline": spec.cmdline,
        "balloon_target_mib": vm.balloon_target_mib,
        "volumes": [{"index": i, "file": f"volume{i}.img", "serial": v.serial,
                     "guest_path": v.spec.guest_path, "read_only": v.spec.read_only,
                     "host_path": str(v.spec.host_path)}
                    for i, v in enumerate(spec.data_volumes)],
        "rootfs": rootfs.to_record(spec.rootfs) if spec.rootfs is not None else None,
    }
    name = vm.name

    def finish() -> Snapshot:
        try:
            try:
                engine_state = finish_engine()
            except (EngineError, TimeoutError, OSError) as exc:
                raise SnapshotError(f"snapshot of VM {name!r} failed: {exc}") from exc
            state_name, ram_name = engine_state["state_file"], engine_state["ram_file"]
            files = {state_name: {"size": (tmp / state_name).stat().st_size,
                                  "sha256": file_sha256(tmp / state_name)}}
            for file in [ram_name] + [v["file"] for v in header["volumes"]]:
                files[file] = {"size": (tmp / file).stat().st_size,
                               "digest": content_digest(tmp / file)}
            header.update(engine_state=engine_state, files=files)
            (tmp / HEADER_FILE).write_bytes(encode_header(header))
            os.chmod(tmp, 0o755)
            if path.exists():
                # Never rewrite a snapshot in place: restored VMs map its RAM file. Renaming
                # the old directory away keeps their files alive until they stop.
                old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Snapshot.open(path)

    return finish
