"""``VmConfigForm``: a form that edits a :class:`~supermachine_jupyter.config.VmConfig`.

Two-way linked: a widget change assigns the config's trait, and a config change (a trait
assigned anywhere, or a whole new config given to ``form.config``) updates the widgets.

Invalid entries: the config validates every value (a ``TraitError`` naming the field and what
it accepts). When it refuses an entry, the form shows that message inline in red under the
section, the offending widget **keeps what the user typed** (a list row gets a red border),
and the config keeps its last valid value. Correcting the entry, or any change of that field
from the config side, clears the mark. A volume or mount row with an empty required field is
*incomplete*, not invalid: it is left out of the config (with a grey note) until it is filled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as widgets
from traitlets import Instance, TraitError

from ..config import (
    DEFAULT_VOLUME_SIZE_MIB,
    ENGINES,
    FIELDS,
    MIN_MEMORY_MIB,
    MountSpec,
    VmConfig,
    VolumeSpec,
    host_cpu_count,
    host_memory_mib,
)
from .format import ERROR_COLOUR, error_html, note_html
from .sampler import close_tree


def memory_stops_mib(host_mib: int) -> list[int]:
    """The memory slider's stops: 64, 128, 192, then 256, 384, 512, 768, 1024, … (each
    power of two and the one-and-a-half between), up to the host's RAM, which ends the list.

    A linear 64 … 24152 MiB slider puts every size a notebook uses in its first pixels; on
    these stops 256 MiB sits a quarter of the way along and each stop is a step a person
    would pick. Other sizes are typed in the box beside it."""
    stops = [size for size in (64, 128, 192) if size <= host_mib]
    size = 256
    while size <= host_mib:
        stops += [s for s in (size, size * 3 // 2) if s <= host_mib]
        size *= 2
    if not stops or stops[-1] != host_mib:
        stops.append(max(host_mib, MIN_MEMORY_MIB))
    return stops


def memory_label(size_mib: int) -> str:
    """``512`` → ``'512 MiB'``, ``1536`` → ``'1.5 GiB'`` (the slider's readout)."""
    if size_mib >= 1024 and size_mib % 512 == 0:
        return f"{size_mib / 1024:g} GiB"
    return f"{size_mib} MiB"

#: The fields the form edits; the others (assets, vsock_mux_dir, restore_timeout) are kept.
FORM_FIELDS = ("memory_mib", "vcpus", "balloon", "engine", "name", "volumes", "mounts")

_INVALID_BORDER = f"1px solid {ERROR_COLOUR}"


class _Row:
    """One editable row of the volume or mount list."""

    #: (attribute, placeholder, width) of the row's text fields, in order
    TEXT_FIELDS: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, on_change: Callable[[], None], on_remove: Callable[[_Row], None]):
        self.texts: dict[str, widgets.Text] = {}
        for attr, placeholder, width in self.TEXT_FIELDS:
            text = widgets.Text(placeholder=placeholder, continuous_update=False,
                                layout=widgets.Layout(width=width))
            self.texts[attr] = text
            setattr(self, attr, text)
        self.read_only = widgets.Checkbox(description="ro", indent=False,
                                          layout=widgets.Layout(width="50px"))
        self.remove_button = widgets.Button(description="✕", tooltip="remove this row",
                                            layout=widgets.Layout(width="36px"))
        self.remove_button.on_click(lambda _: on_remove(self))
        for control in self.controls():
            if control is not self.remove_button:
                control.observe(lambda _: on_change(), names="value")
        self.box = widgets.HBox(self.controls())

    def controls(self) -> list[widgets.Widget]:
        return [*self.texts.values(), self.read_only, self.remove_button]

    def missing(self) -> list[str]:
        """Required fields left empty (an incomplete row is not part of the config)."""
        return [attr for attr, text in self.texts.items() if not text.value.strip()]

    def is_blank(self) -> bool:
        return len(self.missing()) == len(self.texts)

    def spec(self) -> Any:
        raise NotImplementedError

    def show(self, spec: Any) -> None:
        raise NotImplementedError

    def mark_invalid(self, invalid: bool) -> None:
        self.box.layout.border = _INVALID_BORDER if invalid else ""

    def values(self) -> dict[str, Any]:
        """What the row's widgets hold, by field name."""
        return {attr: text.value for attr, text in self.texts.items()} | {
            "read_only": self.read_only.value}

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.values().items())
        return f"{type(self).__name__}({fields})"


class _VolumeRow(_Row):
    TEXT_FIELDS = (("host_path", "host file (created on first use)", "260px"),
                   ("guest_path", "guest path, e.g. /data", "160px"))

    def __init__(self, on_change, on_remove):
        # 0 stands for VolumeSpec.size_mib=None: an existing file's own size, else 1024 MiB.
        self.size_mib = widgets.IntText(value=0, description="MiB",
                                        tooltip=f"0: the existing file's size, or "
                                                f"{DEFAULT_VOLUME_SIZE_MIB} MiB for a new file",
                                        layout=widgets.Layout(width="150px"),
                                        style={"description_width": "30px"})
        super().__init__(on_change, on_remove)

    def controls(self):
        return [*self.texts.values(), self.size_mib, self.read_only, self.remove_button]

    def spec(self) -> VolumeSpec:
        return VolumeSpec(self.host_path.value.strip(), self.guest_path.value.strip(),
                          self.size_mib.value or None, self.read_only.value)

    def show(self, spec: VolumeSpec) -> None:
        self.host_path.value = spec.host_path
        self.guest_path.value = spec.guest_path
        self.size_mib.value = spec.size_mib or 0
        self.read_only.value = spec.read_only

    def values(self):
        return super().values() | {"size_mib": self.size_mib.value}


class _MountRow(_Row):
    TEXT_FIELDS = (("host_path", "host directory", "260px"),
                   ("tag", "virtio-fs tag", "120px"),
                   ("guest_path", "guest path, e.g. /mnt/host", "160px"))

    def spec(self) -> MountSpec:
        return MountSpec(self.host_path.value.strip(), self.tag.value.strip(),
                         self.guest_path.value.strip(), self.read_only.value)

    def show(self, spec: MountSpec) -> None:
        self.host_path.value = spec.host_path
        self.tag.value = spec.tag
        self.guest_path.value = spec.guest_path
        self.read_only.value = spec.read_only


class VmConfigForm(widgets.VBox):
    """A form editing ``form.config`` (a :class:`VmConfig`), two-way linked.

    Widgets (attributes, for code and tests): ``memory`` (a slider over sizes people pick,
    64 MiB … host RAM, see :func:`memory_stops_mib`), ``memory_text`` (the same value,
    typed: any size the config accepts; an out-of-range number is shown as an inline error
    naming the range, never clamped), ``memory_default`` ("default" = None, the image's
    size), ``vcpus``/
    ``vcpus_default``, ``balloon``, ``engine``, ``name`` (empty = unnamed), ``volume_rows``
    and ``mount_rows`` (lists of rows with ``host_path``, ``guest_path``, ``size_mib`` or
    ``tag``, ``read_only`` and ``remove_button``), ``add_volume_button``,
    ``add_mount_button``. ``form.errors`` maps a field to the message shown for it.

    ``VmConfigForm(config)`` edits that very config object in place (``form.config is
    config``); assign ``form.config = other`` to switch to another one. Fields the form has
    no widget for (assets, vsock_mux_dir, restore_timeout) are left as they are.
    """

    config = Instance(VmConfig, help="The VmConfig this form edits (in place).")

    def __init__(self, config: VmConfig | None = None, **kwargs: Any):
        self._showing = 0          # > 0 while the form writes config values into widgets
        self._errors: dict[str, str] = {}
        self._notes: dict[str, str] = {}
        self._observed: VmConfig | None = None

        def labelled(description: str, **extra: Any) -> dict:
            return {"description": description, "style": {"description_width": "90px"},
                    **extra}

        self.memory = widgets.SelectionSlider(
            options=[(memory_label(size), size) for size in memory_stops_mib(host_memory_mib())],
            value=256 if host_memory_mib() >= 256 else MIN_MEMORY_MIB, continuous_update=False,
            layout=widgets.Layout(width="320px"), **labelled("memory"))
        self.memory_text = widgets.IntText(
            value=self.memory.value, continuous_update=False,
            tooltip=f"MiB, from {MIN_MEMORY_MIB} to {host_memory_mib()} (host RAM)",
            layout=widgets.Layout(width="100px"), description="MiB",
            style={"description_width": "30px"})
        self.memory_default = widgets.Checkbox(description="default", indent=False,
                                               layout=widgets.Layout(width="90px"))
        self.vcpus = widgets.IntSlider(
            value=1, min=1, max=max(1, host_cpu_count()), continuous_update=False,
            layout=widgets.Layout(width="420px"), **labelled("vCPUs"))
        self.vcpus_default = widgets.Checkbox(description="default", indent=False,
                                              layout=widgets.Layout(width="90px"))
        self.balloon = widgets.Checkbox(description="virtio-balloon", indent=False)
        self.engine = widgets.Dropdown(options=list(ENGINES), **labelled("engine"),
                                       layout=widgets.Layout(width="220px"))
        self.name = widgets.Text(placeholder="unnamed", continuous_update=False,
                                 **labelled("name"), layout=widgets.Layout(width="320px"))
        self.volume_rows: list[_VolumeRow] = []
        self.mount_rows: list[_MountRow] = []
        self._rows_box = {"volumes": widgets.VBox(), "mounts": widgets.VBox()}
        self.add_volume_button = widgets.Button(description="+ volume",
                                                tooltip="add a virtio-blk data volume")
        self.add_mount_button = widgets.Button(description="+ mount",
                                               tooltip="add a virtio-fs host directory mount")
        self.add_volume_button.on_click(lambda _: self.add_row("volumes"))
        self.add_mount_button.on_click(lambda _: self.add_row("mounts"))
        #: one inline message line per field (red error, or grey note for incomplete rows)
        self.messages = {field: widgets.HTML() for field in FORM_FIELDS}

        for field, slider, use_default in (("memory_mib", self.memory, self.memory_default),
                                           ("vcpus", self.vcpus, self.vcpus_default)):
            slider.observe(lambda _, f=field: self._edit_number(f, moved=True), names="value")
            use_default.observe(lambda _, f=field: self._edit_number(f), names="value")
        self.memory_text.observe(lambda _: self._edit_number("memory_mib", typed=True),
                                 names="value")
        self.balloon.observe(lambda c: self._edit("balloon", c["new"]), names="value")
        self.engine.observe(lambda c: self._edit("engine", c["new"]), names="value")
        self.name.observe(lambda c: self._edit("name", c["new"].strip() or None), names="value")

        header = widgets.HTML
        children = [
            widgets.HBox([self.memory, self.memory_text, self.memory_default]),
            self.messages["memory_mib"],
            widgets.HBox([self.vcpus, self.vcpus_default]), self.messages["vcpus"],
            widgets.HBox([self.engine, self.balloon]),
            self.messages["engine"], self.messages["balloon"],
            self.name, self.messages["name"],
            header("<b>Volumes</b> <small>(virtio-blk, ext4, persistent: host file · guest "
                   "path · size · read-only)</small>"),
            self._rows_box["volumes"], self.add_volume_button, self.messages["volumes"],
            header("<b>Mounts</b> <small>(virtio-fs: host directory · tag · guest path · "
                   "read-only)</small>"),
            self._rows_box["mounts"], self.add_mount_button, self.messages["mounts"],
        ]
        super().__init__(children=children, **kwargs)
        self.observe(self._on_config_replaced, names="config")
        self.config = config if config is not None else VmConfig()

    # -- public ------------------------------------------------------------------------
    @property
    def errors(self) -> dict[str, str]:
        """``{field: message}`` of the entries the config refused (empty when all valid)."""
        return dict(self._errors)

    @property
    def notes(self) -> dict[str, str]:
        """``{field: note}`` about incomplete volume or mount rows (not errors)."""
        return dict(self._notes)

    def add_row(self, field: str, spec: VolumeSpec | MountSpec | None = None) -> _Row:
        """Append an editable row to ``"volumes"`` or ``"mounts"`` (blank, or showing
        ``spec``; a filled-in row is applied to the config at once)."""
        row_type = {"volumes": _VolumeRow, "mounts": _MountRow}[field]
        row = row_type(lambda: self._edit_list(field), lambda r: self.remove_row(field, r))
        if spec is not None:
            with self._quiet():
                row.show(spec)
        self._rows(field).append(row)
        self._render_rows(field)
        if spec is not None:
            self._edit_list(field)
        return row

    def remove_row(self, field: str, row: _Row) -> None:
        """Remove a row from ``"volumes"`` or ``"mounts"`` and apply the list."""
        rows = self._rows(field)
        if row in rows:
            rows.remove(row)
            self._render_rows(field)
            self._edit_list(field)

    def close(self) -> None:
        """Unlink from the config and close every widget of the form."""
        if self._observed is not None:
            self._observed.unobserve(self._on_config_field, names=list(FIELDS))
            self._observed = None
        close_tree(self)

    def __repr__(self) -> str:
        errors = f", errors={sorted(self._errors)}" if self._errors else ""
        return f"VmConfigForm({self.config!r}{errors})"

    # -- widget → config ---------------------------------------------------------------
    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Widgets change because the config did: do not write them back."""
        self._showing += 1
        try:
            yield
        finally:
            self._showing -= 1

    def _edit(self, field: str, value: Any) -> bool:
        """Assign ``config.<field> = value``; on TraitError show it and leave config as is."""
        if self._showing:
            return False
        try:
            setattr(self.config, field, value)
        except TraitError as exc:
            self._set_message(field, error=str(exc))
            return False
        self._set_message(field)
        return True

    def _edit_number(self, field: str, moved: bool = False, typed: bool = False) -> None:
        """A slider, the memory box or a "default" box changed. Moving the slider or typing
        a size (possible from code; the UI disables them under "default") means the user
        wants that number: untick default. A typed size the config refuses stays in the box
        with the config's message (the range) under it; the slider does not move."""
        if self._showing:
            return
        slider, use_default = ((self.memory, self.memory_default) if field == "memory_mib"
                               else (self.vcpus, self.vcpus_default))
        if (moved or typed) and use_default.value:
            with self._quiet():
                use_default.value = False
        slider.disabled = use_default.value
        if field == "memory_mib":
            self.memory_text.disabled = use_default.value
        value = self.memory_text.value if typed else slider.value
        if self._edit(field, None if use_default.value else value) and field == "memory_mib":
            with self._quiet():
                self._show_memory(value)

    def _rows(self, field: str) -> list:
        return self.volume_rows if field == "volumes" else self.mount_rows

    def _render_rows(self, field: str) -> None:
        self._rows_box[field].children = [row.box for row in self._rows(field)]

    def _parse_rows(self, field: str) -> tuple[list, str | None, list[str]]:
        """The specs of the complete rows, the first row error (marking rows), and notes."""
        specs, error, notes = [], None, []
        for number, row in enumerate(self._rows(field), start=1):
            missing = row.missing()
            if missing and not row.is_blank():
                notes.append(f"row {number} is incomplete (needs {', '.join(missing)}) and "
                             "is not in the config yet")
            if missing:
                row.mark_invalid(False)
                continue
            try:
                specs.append(row.spec())
            except TraitError as exc:
                row.mark_invalid(True)
                error = error or f"{field} row {number}: {exc}"
            else:
                row.mark_invalid(False)
        return specs, error, notes

    def _edit_list(self, field: str) -> None:
        if self._showing:
            return
        specs, error, notes = self._parse_rows(field)
        note = "; ".join(notes) or None
        if error is None:
            try:
                setattr(self.config, field, specs)
            except TraitError as exc:
                error = str(exc)
        self._rows_box[field].layout.border = ""
        if error is not None and all(not r.box.layout.border for r in self._rows(field)):
            self._rows_box[field].layout.border = _INVALID_BORDER   # a cross-row conflict
        self._set_message(field, error=error, note=note)

    def _set_message(self, field: str, error: str | None = None, note: str | None = None) -> None:
        for store, text in ((self._errors, error), (self._notes, note)):
            if text:
                store[field] = text
            else:
                store.pop(field, None)
        self.messages[field].value = error_html(error) or note_html(note)

    # -- config → widgets --------------------------------------------------------------
    def _show_memory(self, size_mib: int) -> None:
        """Put ``size_mib`` on the slider (as a stop of its own when it falls between two)
        and in the box."""
        options = [value for _, value in self.memory.options]
        if size_mib not in options:
            options = sorted({*options, size_mib})
            self.memory.options = [(memory_label(size), size) for size in options]
        self.memory.value = size_mib
        self.memory_text.value = size_mib

    def _on_config_replaced(self, change: dict) -> None:
        if self._observed is not None:
            self._observed.unobserve(self._on_config_field, names=list(FIELDS))
        self._observed = change["new"]
        self._observed.observe(self._on_config_field, names=list(FIELDS))
        for field in FORM_FIELDS:
            self._show(field, rebuild=True)

    def _on_config_field(self, change: dict) -> None:
        if change["name"] in FORM_FIELDS:
            self._show(change["name"])

    def _show(self, field: str, rebuild: bool = False) -> None:
        """Make the widgets of ``field`` show the config's value; clears its error."""
        value = getattr(self.config, field)
        with self._quiet():
            if field == "memory_mib":
                self.memory_default.value = value is None
                self.memory.disabled = self.memory_text.disabled = value is None
                if value is not None:
                    self._show_memory(value)
            elif field == "vcpus":
                self.vcpus_default.value = value is None
                self.vcpus.disabled = value is None
                if value is not None:
                    self.vcpus.value = value
            elif field == "name":
                self.name.value = value or ""
            elif field in ("volumes", "mounts"):
                specs, error, _ = self._parse_rows(field)
                if rebuild or error is not None or specs != list(value):
                    # Not what the rows say (changed elsewhere): rebuild the rows from it.
                    for row in self._rows(field):
                        row.box.close()
                    self._rows(field).clear()
                    for spec in value:
                        row = self.add_row(field)
                        row.show(spec)
                    self._rows_box[field].layout.border = ""
                _, _, notes = self._parse_rows(field)
                self._set_message(field, note="; ".join(notes) or None)
                return
            else:
                getattr(self, field).value = value
        self._set_message(field)
