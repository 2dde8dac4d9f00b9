/**
 * The views of the MicroVMs sidebar: `VmSidebar` (header with the notebook/all filter, list,
 * empty and error states) and one `VmCard` per VM. Cards are keyed by VM id and updated in
 * place at every poll, so buttons and inputs under the user's pointer are never replaced.
 */

import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  bytesToMiB,
  formatBytes,
  formatDuration,
  formatMiB,
  formatVcpus,
  percent
} from './format';
import { IMount, IVm, IVolume, VmListModel } from './model';
import { NotebookScope } from './scope';

export function basename(path: string): string {
  const parts = path.split('/');
  return parts[parts.length - 1] || path;
}

const STATE_CLASS: Record<string, string> = {
  booting: 'sm-mod-booting',
  running: 'sm-mod-running',
  stopping: 'sm-mod-stopping',
  stopped: 'sm-mod-stopped',
  failed: 'sm-mod-failed'
};

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** One VM: name, state, engine, size, balloon bar, mounts and volumes, Stop. */
export class VmCard {
  readonly node: HTMLElement;

  constructor(
    private _model: VmListModel,
    private _scope: NotebookScope,
    vm: IVm
  ) {
    this.id = vm.id;
    this.node = el('div', 'sm-VmCard');
    this.node.dataset.vmId = vm.id;
    this.node.dataset.vmName = vm.name;

    const head = el('div', 'sm-VmCard-head');
    this._name = el('span', 'sm-VmCard-name');
    this._state = el('span', 'sm-VmCard-state');
    this._stop = el('button', 'sm-Button sm-mod-warn sm-VmCard-stop', 'Stop');
    this._stop.title = 'Power the VM off';
    this._stop.addEventListener('click', () => void this._onStop());
    head.append(this._name, this._state, this._stop);

    this._meta = el('div', 'sm-VmCard-meta');
    this._owner = el('div', 'sm-VmCard-owner');
    this._reason = el('div', 'sm-VmCard-reason');

    this._balloon = el('div', 'sm-Balloon');
    this._bar = el('div', 'sm-Balloon-bar');
    this._barBalloon = el('div', 'sm-Balloon-taken');
    this._barUsed = el('div', 'sm-Balloon-used');
    this._bar.append(this._barBalloon, this._barUsed);
    this._barLabel = el('div', 'sm-Balloon-label');
    this._balloonForm = el('div', 'sm-Balloon-form');
    this._balloonInput = el('input', 'sm-Balloon-input');
    this._balloonInput.type = 'number';
    this._balloonInput.min = '0';
    this._balloonInput.step = '16';
    this._balloonInput.title = 'Balloon size in MiB (memory taken from the guest)';
    const set = el('button', 'sm-Button', 'Set');
    set.title = 'Set the balloon size';
    set.addEventListener('click', () => void this._onBalloon());
    this._balloonInput.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        void this._onBalloon();
      }
    });
    this._balloonInput.addEventListener('input', () => this._validateBalloon());
    this._balloonForm.append(el('span', '', 'balloon'), this._balloonInput, el('span', '', 'MiB'), set);
    this._balloonError = el('div', 'sm-Balloon-error');
    this._balloon.append(this._bar, this._barLabel, this._balloonForm, this._balloonError);

    this._devices = el('ul', 'sm-VmCard-devices');
    this._message = el('div', 'sm-VmCard-message');
    this.node.append(
      head,
      this._meta,
      this._owner,
      this._balloon,
      this._devices,
      this._reason,
      this._message
    );
    this.update(vm);
  }

  readonly id: string;

  update(vm: IVm): void {
    this._vm = vm;
    this._name.textContent = vm.name;
    this._name.title = `id ${vm.id}`;
    const state = this._stopping && vm.state === 'running' ? 'stopping' : vm.state;
    this._state.textContent = state;
    this._state.className = `sm-VmCard-state ${STATE_CLASS[state] ?? ''}`;
    this.node.dataset.state = state;
    this._stop.disabled = this._stopping || vm.state !== 'running';
    this._stop.title =
      vm.state === 'booting' ? 'The VM is booting: it can be stopped once it runs' : 'Power the VM off';
    const host =
      typeof vm.host_memory_bytes === 'number' ? `host ${formatMiB(bytesToMiB(vm.host_memory_bytes))}` : '';
    this._meta.textContent = (
      vm.state === 'booting'
        ? ['booting', formatMiB(vm.memory_mib), formatVcpus(vm.vcpus), formatDuration(vm.uptime_s)]
        : [
            `${vm.engine}/${vm.accel}`,
            formatMiB(vm.memory_mib),
            formatVcpus(vm.vcpus),
            host,
            `up ${formatDuration(vm.uptime_s)}`
          ]
    )
      .filter(Boolean)
      .join(' · ');
    // Why this engine was chosen is detail: a tooltip, not a line on every card.
    this._meta.title = [
      vm.reason ? `engine: ${vm.reason}` : '',
      host ? 'host: the memory this VM holds resident on the host (its engine\'s RSS)' : ''
    ]
      .filter(Boolean)
      .join('\n');
    const owner = vm.notebook
      ? `from ${basename(vm.notebook)}`
      : vm.kernel_id
        ? `kernel ${vm.kernel_id.slice(0, 8)}`
        : 'started outside a notebook';
    this._owner.textContent = `${owner} · pid ${vm.pid}`;
    this._owner.title = [
      vm.notebook ? `notebook ${vm.notebook}` : '',
      vm.kernel_id ? `kernel ${vm.kernel_id}` : '',
      `owner pid ${vm.pid}`
    ]
      .filter(Boolean)
      .join('\n');
    this._reason.textContent = vm.failure ?? '';
    this._reason.style.display = vm.failure ? '' : 'none';
    this._updateBalloon(vm);
    this._updateDevices(vm.mounts ?? [], vm.volumes ?? []);
  }

  private _updateBalloon(vm: IVm): void {
    const stats = vm.balloon_stats;
    const total = vm.memory_mib;
    this._balloonForm.style.display = vm.balloon && vm.state === 'running' ? '' : 'none';
    this._balloonInput.max = String(Math.max(0, total - 1));
    if (!vm.balloon || !stats) {
      this._barBalloon.style.width = '0%';
      this._barUsed.style.width = '0%';
      this._barLabel.textContent =
        vm.state === 'booting'
          ? 'waiting for the guest to boot'
          : vm.balloon
            ? 'balloon: waiting for statistics'
            : 'no balloon device (start with %%vm --balloon)';
      this._bar.classList.add('sm-mod-empty');
      return;
    }
    this._bar.classList.remove('sm-mod-empty');
    const taken = stats.actual_mib;
    let used: number | null = null;
    if (stats.total_memory !== null && stats.available_memory !== null) {
      used = bytesToMiB(stats.total_memory - stats.available_memory);
    }
    this._barBalloon.style.width = percent(taken, total);
    this._barUsed.style.width = percent(used ?? 0, total);
    const parts = [`balloon ${formatMiB(taken)}`];
    if (stats.target_mib !== taken) {
      parts[0] += ` → ${formatMiB(stats.target_mib)}`;
    }
    if (used !== null) {
      parts.push(`guest uses ${formatMiB(used)}`);
    }
    if (stats.available_memory !== null) {
      parts.push(`${formatBytes(stats.available_memory)} available`);
    }
    this._barLabel.textContent = parts.join(' · ');
    this._bar.title = `of ${formatMiB(total)}: balloon (hatched), guest in use (solid)`;
    // Never overwrite what the user is typing, nor an entry marked invalid (its message
    // would then describe a value no longer shown).
    if (
      document.activeElement !== this._balloonInput &&
      !this._balloonInput.classList.contains('sm-mod-invalid')
    ) {
      this._balloonInput.value = String(stats.target_mib);
    }
  }

  private _updateDevices(mounts: IMount[], volumes: IVolume[]): void {
    const items: HTMLElement[] = [];
    const now = Date.now() / 1000;
    for (const m of mounts) {
      const li = el('li', 'sm-Device sm-mod-mount');
      li.append(
        el('span', 'sm-Device-kind', 'fs'),
        el('span', 'sm-Device-path', `${basename(m.host_path)} → ${m.guest_path}${m.read_only ? ' (ro)' : ''}`),
        el('span', 'sm-Device-detail', this._mountActivity(m, now))
      );
      li.title = `virtio-fs tag ${m.tag} ← ${m.host_path}${m.dax ? ' (DAX)' : ''}\n${m.dax_note}`;
      items.push(li);
    }
    for (const v of volumes) {
      const li = el('li', 'sm-Device sm-mod-volume');
      const used = typeof v.used_bytes === 'number' ? `${formatBytes(v.used_bytes)} used` : '';
      const size = typeof v.size_bytes === 'number' ? `of ${formatBytes(v.size_bytes)}` : '';
      li.append(
        el('span', 'sm-Device-kind', 'blk'),
        el('span', 'sm-Device-path', `${v.guest_path}${v.read_only ? ' (ro)' : ''}`),
        el('span', 'sm-Device-detail', [used, size].filter(Boolean).join(' '))
      );
      li.title = `volume ${v.serial} ← ${v.host_path}`;
      items.push(li);
    }
    this._devices.replaceChildren(...items);
    this._devices.style.display = items.length ? '' : 'none';
  }

  /** Totals, and rates since the last refresh once there is one (what a class watches). */
  private _mountActivity(m: IMount, now: number): string {
    const totals = `${m.ops} ops · ${formatBytes(m.bytes_read)} read · ${formatBytes(m.bytes_written)} written`;
    const before = this._mountSeen.get(m.tag);
    this._mountSeen.set(m.tag, { time: now, ops: m.ops, read: m.bytes_read, written: m.bytes_written });
    const seconds = before ? now - before.time : 0;
    if (!before || seconds <= 0 || m.ops < before.ops) {
      return totals;
    }
    const rate = (n: number) => n / seconds;
    return (
      `${totals} · now ${rate(m.ops - before.ops).toFixed(0)} ops/s, ` +
      `${formatBytes(rate(m.bytes_read - before.read))}/s read, ` +
      `${formatBytes(rate(m.bytes_written - before.written))}/s written`
    );
  }

  private async _onStop(): Promise<void> {
    const vm = this._vm;
    if (!this._scope.owns(vm.kernel_id)) {
      // Not this notebook's VM: another person's work may depend on it.
      const owner = vm.notebook
        ? `the notebook ${basename(vm.notebook)}`
        : vm.kernel_id
          ? `kernel ${vm.kernel_id.slice(0, 8)}`
          : `process ${vm.pid}, outside any notebook`;
      const result = await showDialog({
        title: `Stop ${vm.name}?`,
        body: `${vm.name} belongs to ${owner}, not to the notebook you are in. Stopping it powers it off there too, and whatever runs in it is lost.`,
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop it' })]
      });
      if (!result.button.accept) {
        return;
      }
    }
    this._stopping = true;
    this._message.textContent = '';
    this.update(this._vm);
    try {
      await this._model.stop(this.id);
    } catch (err) {
      this._stopping = false;
      this._message.textContent = `stop failed: ${(err as Error).message}`;
      this.update(this._vm);
    }
  }

  /** The balloon size typed, or null with an inline message saying what is allowed. */
  private _validateBalloon(): number | null {
    const max = Math.max(0, this._vm.memory_mib - 1);
    const text = this._balloonInput.value.trim();
    const value = Number(text);
    const ok = text !== '' && Number.isInteger(value) && value >= 0 && value <= max;
    this._balloonError.textContent = ok
      ? ''
      : `Enter a whole number of MiB from 0 to ${max}: the balloon takes that much memory ` +
        `from the guest's ${formatMiB(this._vm.memory_mib)} (0 gives it all back).`;
    this._balloonInput.classList.toggle('sm-mod-invalid', !ok);
    this._balloonInput.setAttribute('aria-invalid', String(!ok));
    return ok ? value : null;
  }

  private async _onBalloon(): Promise<void> {
    const value = this._validateBalloon();
    this._message.textContent = '';
    if (value === null) {
      return;
    }
    try {
      await this._model.setBalloon(this.id, value);
      this._balloonInput.blur();
    } catch (err) {
      this._message.textContent = `balloon: ${(err as Error).message}`;
    }
  }

  private _vm!: IVm;
  private _stopping = false;
  private _name: HTMLElement;
  private _state: HTMLElement;
  private _stop: HTMLButtonElement;
  private _meta: HTMLElement;
  private _owner: HTMLElement;
  private _reason: HTMLElement;
  private _balloon: HTMLElement;
  private _bar: HTMLElement;
  private _barBalloon: HTMLElement;
  private _barUsed: HTMLElement;
  private _barLabel: HTMLElement;
  private _balloonForm: HTMLElement;
  private _balloonInput: HTMLInputElement;
  private _balloonError: HTMLElement;
  private _devices: HTMLElement;
  private _mountSeen = new Map<string, { time: number; ops: number; read: number; written: number }>();
  private _message: HTMLElement;
}

/** Which VMs the sidebar lists: the current notebook's, or every one on the machine. */
export type SidebarScope = 'notebook' | 'all';

/** The left-sidebar panel: a header, then one card per VM (or the empty/error state). */
export class VmSidebar extends Widget {
  constructor(options: { model: VmListModel; scope: NotebookScope }) {
    super();
    this._model = options.model;
    this._scope = options.scope;
    this.addClass('sm-VmSidebar');

    const header = el('div', 'sm-VmSidebar-header');
    const title = el('h2', 'sm-VmSidebar-title', 'MicroVMs');
    this._count = el('span', 'sm-VmSidebar-count');
    const refresh = el('button', 'sm-Button sm-VmSidebar-refresh', 'Refresh');
    refresh.title = 'Refresh the list now';
    refresh.addEventListener('click', () => void this._model.refresh());
    header.append(title, this._count, refresh);

    // The filter: this notebook's VMs (the default) or all of the machine's.
    this._filter = el('div', 'sm-VmSidebar-filter');
    this._filter.setAttribute('role', 'group');
    this._filter.setAttribute('aria-label', 'Which VMs to list');
    for (const [scope, label, tip] of [
      ['notebook', 'This notebook', "VMs started by the current notebook's kernel"],
      ['all', 'All on this machine', 'Every VM on this machine, from any notebook or script']
    ] as [SidebarScope, string, string][]) {
      const button = el('button', 'sm-Button sm-VmSidebar-scope', label);
      button.dataset.scope = scope;
      button.title = tip;
      button.addEventListener('click', () => this.setScopeFilter(scope));
      this._filter.append(button);
    }

    this._error = el('div', 'sm-VmSidebar-error');
    this._list = el('div', 'sm-VmSidebar-list');
    this._empty = el('div', 'sm-VmSidebar-empty');
    this._empty.append(
      el('p', 'sm-VmSidebar-emptyTitle', 'No microVMs are running.'),
      // Two cells: a cell magic must be its cell's first line.
      el('p', '', 'Load the extension in one cell:'),
      el('pre', 'sm-VmSidebar-code', '%load_ext supermachine_jupyter'),
      el('p', '', 'then start a VM from the next one:'),
      el('pre', 'sm-VmSidebar-code', '%%vm --name demo\nuname -a'),
      el('p', 'sm-VmSidebar-hint', 'A VM started with --name stays up for later cells and is listed here until it stops.')
    );
    this._filtered = el('div', 'sm-VmSidebar-filtered');
    this.node.append(header, this._filter, this._error, this._list, this._filtered, this._empty);
    this._model.changed.connect(this._render, this);
    this._scope.changed.connect(this._render, this);
    this._render();
  }

  /** Which VMs are listed: 'notebook' (the current notebook's kernel) or 'all'. */
  get scopeFilter(): SidebarScope {
    return this._scopeFilter;
  }

  setScopeFilter(scope: SidebarScope): void {
    this._scopeFilter = scope;
    this._render();
  }

  protected onAfterShow(): void {
    void this._model.refresh();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    this._scope.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const everyVm = this._model.vms;
    const vms =
      this._scopeFilter === 'all' ? everyVm : everyVm.filter(vm => this._scope.owns(vm.kernel_id));
    const error = this._model.error;
    this._error.textContent = error ? `Cannot list VMs: ${error}` : '';
    this._error.style.display = error ? '' : 'none';
    this._count.textContent = !this._model.loaded
      ? '…'
      : vms.length === everyVm.length
        ? String(vms.length)
        : `${vms.length} of ${everyVm.length}`;
    for (const button of Array.from(this._filter.querySelectorAll<HTMLElement>('button'))) {
      const pressed = button.dataset.scope === this._scopeFilter;
      button.classList.toggle('sm-mod-selected', pressed);
      button.setAttribute('aria-pressed', String(pressed));
    }

    const seen = new Set<string>();
    let previous: HTMLElement | null = null;
    for (const vm of vms) {
      seen.add(vm.id);
      let card = this._cards.get(vm.id);
      if (card) {
        card.update(vm);
      } else {
        card = new VmCard(this._model, this._scope, vm);
        this._cards.set(vm.id, card);
      }
      // keep the server's order (oldest first)
      const next: Element | null = previous ? previous.nextElementSibling : this._list.firstElementChild;
      if (next !== card.node) {
        this._list.insertBefore(card.node, next);
      }
      previous = card.node;
    }
    for (const [id, card] of this._cards) {
      if (!seen.has(id)) {
        card.node.remove();
        this._cards.delete(id);
      }
    }
    const hidden = everyVm.length - vms.length;
    this._filtered.replaceChildren();
    if (this._model.loaded && !vms.length && hidden && !error) {
      const where = this._scope.path ? basename(this._scope.path) : 'this notebook';
      const showAll = el('button', 'sm-Button sm-VmSidebar-showAll', 'Show all');
      showAll.addEventListener('click', () => this.setScopeFilter('all'));
      this._filtered.append(
        el('p', '', `No VMs from ${where}.`),
        el('p', '', `${hidden} VM${hidden === 1 ? '' : 's'} of other notebooks or scripts run on this machine.`),
        showAll
      );
    }
    this._filtered.style.display = this._filtered.childElementCount ? '' : 'none';
    this._empty.style.display = this._model.loaded && !everyVm.length && !error ? '' : 'none';
  }

  private _model: VmListModel;
  private _scope: NotebookScope;
  private _scopeFilter: SidebarScope = 'notebook';
  private _filter: HTMLElement;
  private _filtered: HTMLElement;
  private _cards = new Map<string, VmCard>();
  private _count: HTMLElement;
  private _error: HTMLElement;
  private _list: HTMLElement;
  private _empty: HTMLElement;
}
