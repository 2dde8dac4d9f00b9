"""Where snapshots live: the user cache's ``snapshots/`` folder, and the named snapshots of
``%%vm --snapshot NAME`` (``snapshots/named/NAME``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .format import Snapshot, SnapshotError


def snapshots_dir() -> Path:
    from ..guest.assets import cache_dir
    path = cache_dir() / "snapshots"
    with contextlib.suppress(OSError):      # a read-only cache: read what it holds
        path.mkdir(parents=True, exist_ok=True)
    return path


def named_snapshot_path(name: str) -> Path:
    """Where ``%%vm --snapshot NAME`` keeps a snapshot: ``<cache>/snapshots/named/NAME``."""
    from ..config import _NAME_RE
    if not _NAME_RE.fullmatch(name or ""):
        raise SnapshotError(f"snapshot name {name!r} is not valid: a letter or digit, then up "
                            "to 62 letters, digits, '_', '.' or '-'")
    path = snapshots_dir() / "named"
    path.mkdir(exist_ok=True)
    return path / name


def list_snapshots() -> list[Snapshot]:
    """The named snapshots (``%%vm --snapshot``) that open cleanly."""
    out = []
    for entry in sorted((snapshots_dir() / "named").glob("*")):
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(SnapshotError, OSError):
            out.append(Snapshot.open(entry))
    return out
