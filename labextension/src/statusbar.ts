/**
 * The status-bar item (as jupyter-resource-usage shows the kernel's memory): the current
 * notebook's microVMs and the host memory they hold, e.g. "MicroVMs: 2 · host 310 MiB".
 * Its tooltip lists each VM; a click opens the MicroVMs sidebar.
 */

import { Widget } from '@lumino/widgets';

import { bytesToMiB, formatMiB } from './format';
import { IVm, VmListModel } from './model';
import { NotebookScope } from './scope';

/** The current notebook's VMs: how many, and the host memory they hold (bytes). */
export function summarize(vms: ReadonlyArray<IVm>): { count: number; hostBytes: number; booting: number } {
  let hostBytes = 0;
  let booting = 0;
  for (const vm of vms) {
    hostBytes += typeof vm.host_memory_bytes === 'number' ? vm.host_memory_bytes : 0;
    booting += vm.state === 'booting' ? 1 : 0;
  }
  return { count: vms.length, hostBytes, booting };
}

export class VmStatusItem extends Widget {
  constructor(options: { model: VmListModel; scope: NotebookScope; onClick: () => void }) {
    super();
    this._model = options.model;
    this._scope = options.scope;
    this.addClass('sm-VmStatus');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', options.onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        options.onClick();
      }
    });
    this._model.changed.connect(this._render, this);
    this._scope.changed.connect(this._render, this);
    this._render();
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
    const mine = this._model.vms.filter(vm => this._scope.owns(vm.kernel_id));
    const { count, hostBytes, booting } = summarize(mine);
    const parts = [`MicroVMs: ${count}`];
    if (booting) {
      parts.push(`${booting} booting`);
    }
    if (count > booting) {
      parts.push(`host ${formatMiB(bytesToMiB(hostBytes))}`);
    }
    this.node.textContent = parts.join(' · ');
    this.node.dataset.count = String(count);
    this.node.title = count
      ? [
          "This notebook's microVMs (host: memory resident on the host):",
          ...mine.map(
            vm =>
              `${vm.name} — ${vm.state}, ${formatMiB(vm.memory_mib)} guest` +
              (typeof vm.host_memory_bytes === 'number'
                ? `, ${formatMiB(bytesToMiB(vm.host_memory_bytes))} host`
                : '')
          ),
          'Click to open the MicroVMs sidebar.'
        ].join('\n')
      : 'No microVMs from this notebook. Click to open the MicroVMs sidebar.';
  }

  private _model: VmListModel;
  private _scope: NotebookScope;
}
