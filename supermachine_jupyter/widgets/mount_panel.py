"""``MountPanel``: a VM's data volumes and host directory mounts, with live counters."""

from __future__ import annotations

import threading
import time
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .format import ERROR_COLOUR, clock, count_text, human_bytes, note_html
from .sampler import Sampler, close_tree

if TYPE_CHECKING:
    from ..vm import Vm

COLUMNS = (("kind", "kind"), ("host_path", "host path"), ("guest_path", "guest path"),
           ("tag", "tag / serial"), ("size_bytes", "size"), ("used_bytes", "used on host"),
           ("read_only", "ro"), ("ops", "ops"), ("bytes_read", "read"),
           ("bytes_written", "written"), ("dax", "DAX"))


class MountPanel(widgets.VBox):
    """One row per volume (virtio-blk) and mount (virtio-fs) of ``vm``, refreshed live.

    Each row (see :meth:`rows`) has ``kind`` (``"volume"`` or ``"mount"``), ``host_path``,
    ``guest_path``, ``tag`` (the mount's virtio-fs tag, or the volume's disk serial),
    ``size_bytes`` and ``used_bytes`` (a volume's sparse file: apparent size and the host
    blocks it really uses; None for a mount), ``read_only``, ``ops``, ``bytes_read``,
    ``bytes_written`` (the mount's host-side file server counters; None for a volume, whose
    I/O goes through the engine's block device), ``dax`` and ``dax_note`` (why DAX is off).

    A daemon thread refreshes the table every ``interval`` seconds; it ends when the VM stops
    (the last rows stay shown) or on ``close()``.
    """

    def __init__(self, vm: Vm, interval: float = 1.0, **kwargs: Any):
        self.vm = vm
        self.interval = interval
        self._rows: list[dict] = []
        self._sampled_at: float | None = None
        self._lock = threading.Lock()
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        self.sampler = Sampler(vm, interval, self._refresh_and_render, on_error=self._on_error,
                               on_end=self._on_end, name="mounts")
        super().__init__(children=[self.table, self.status], **kwargs)
        try:
            # Rows at once (stat and /proc reads, no guest round trip), also for a VM that
            # has already stopped; the thread takes over from here.
            self._refresh_and_render()
        except Exception as exc:  # noqa: BLE001 - shown; the thread retries
            self._render()
            self._on_error(exc)
        self.sampler.start()

    @property
    def thread(self) -> threading.Thread:
        """The refresh thread (alive while the panel follows the VM)."""
        return self.sampler.thread

    def rows(self) -> list[dict]:
        """The rows as last sampled (copies), volumes first then mounts."""
        with self._lock:
            return [dict(row) for row in self._rows]

    def refresh(self) -> list[dict]:
        """Sample now (from the calling thread) and return the new rows."""
        self._refresh_and_render()
        return self.rows()

    def close(self) -> None:
        """Stop refreshing and close the widgets (the VM is left alone)."""
        self.sampler.stop()
        close_tree(self)

    def __repr__(self) -> str:
        following = "refreshing" if self.sampler.running else f"ended: {self.sampler.end_reason}"
        return f"MountPanel(vm={self.vm.name!r}, rows={len(self._rows)}, {following})"

    # -- behaviour ---------------------------------------------------------------------
    def _collect(self) -> list[dict]:
        rows = []
        for volume in self.vm.volumes():
            rows.append({"kind": "volume", "host_path": volume["host_path"],
                         "guest_path": volume["guest_path"], "tag": volume["serial"],
                         "size_bytes": volume["size_bytes"],
                         "used_bytes": volume["host_used_bytes"],
                         "read_only": volume["read_only"], "ops": None, "bytes_read": None,
                         "bytes_written": None, "dax": None,
                         "dax_note": "a block device (DAX applies to virtio-fs only)"})
        for mount in self.vm.mounts():
            rows.append({"kind": "mount", "host_path": mount.spec.host_path,
                         "guest_path": mount.spec.guest_path, "tag": mount.spec.tag,
                         "size_bytes": None, "used_bytes": None,
                         "read_only": mount.spec.read_only, "ops": mount.counters.ops,
                         "bytes_read": mount.counters.bytes_read,
                         "bytes_written": mount.counters.bytes_written, "dax": mount.dax,
                         "dax_note": mount.dax_note})
        return rows

    def _refresh_and_render(self) -> None:
        rows = self._collect()
        with self._lock:
            self._rows = rows
            self._sampled_at = time.time()
        self._render()
        self.status.value = note_html(f"refreshing every {self.interval:g} s · last "
                                      f"{clock(self._sampled_at)}")

    def _render(self) -> None:
        rows = self.rows()
        if not rows:
            self.table.value = (f"<i>{escape(self.vm.name)} has no volumes or mounts "
                                "(add them with VmConfig.with_volume / with_virtiofs, or "
                                "%%vm --volume / --mount)</i>")
            return
        cell_style = "padding:2px 8px;vertical-align:top"
        head = "".join(f"<th style='{cell_style};text-align:left;white-space:nowrap'"
                       f"{_header_title(key)}>{label}</th>" for key, label in COLUMNS)
        body = "".join("<tr>" + "".join(
            f"<td style='{cell_style}{';white-space:nowrap' if nowrap else ''}'>{cell}</td>"
            for (cell, nowrap) in zip(_cells(row), _NOWRAP)) + "</tr>" for row in rows)
        self.table.value = ("<div style='line-height:1.4'><table style='border-collapse:"
                            f"collapse;font-size:90%'><tr>{head}</tr>{body}</table></div>")

    def _on_error(self, exc: BaseException) -> None:
        self.status.value = note_html(f"refresh failed: {exc}", ERROR_COLOUR)

    def _on_end(self, reason: str) -> None:
        if reason != "closed":
            at = f" (last rows from {clock(self._sampled_at)})" if self._sampled_at else ""
            self.status.value = note_html(f"{reason}: no longer refreshed{at}")


#: Header tooltips for the columns whose label is a term of art.
_HEADER_TITLES = {"dax": "DAX: the guest maps host file pages directly instead of copying "
                         "them (virtio-fs only)",
                  "tag": "a mount's virtio-fs tag, or a volume's disk serial"}


def _header_title(key: str) -> str:
    title = _HEADER_TITLES.get(key)
    return f" title='{escape(title)}'" if title else ""


#: Columns kept on one line (numbers and short words); paths may wrap.
_NOWRAP = [key not in ("host_path", "guest_path") for key, _ in COLUMNS]


def _cells(row: dict) -> list[str]:
    """The HTML cells of one row, in COLUMNS order."""
    if row["dax"] is None:
        dax = "n/a"
    elif row["dax"]:
        dax = "on"
    else:   # why it is off is a detail: the cell's tooltip
        dax = f"<span title='{escape(row['dax_note'])}' style='cursor:help'>off</span>"
    return [escape(row["kind"]), f"<code>{escape(row['host_path'])}</code>",
            f"<code>{escape(row['guest_path'])}</code>", escape(row["tag"]),
            human_bytes(row["size_bytes"]), human_bytes(row["used_bytes"]),
            "yes" if row["read_only"] else "no", count_text(row["ops"]),
            human_bytes(row["bytes_read"]), human_bytes(row["bytes_written"]), dax]
