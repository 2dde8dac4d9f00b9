/**
 * Which notebook the user is working in: the main-area widget that has a kernel
 * (a notebook or a console), followed as the user switches tabs and kernels. The sidebar
 * filters to its VMs, the status bar counts them, and Stop asks before ending a VM of
 * another notebook.
 */

import { ILabShell } from '@jupyterlab/application';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

/** The part of a notebook or console panel we use (no @jupyterlab/notebook dependency). */
interface IKernelWidget extends Widget {
  sessionContext: {
    path: string;
    session: { kernel: { id: string } | null } | null;
    kernelChanged: ISignal<unknown, unknown>;
  };
}

function hasKernelContext(widget: Widget | null): widget is IKernelWidget {
  return !!widget && typeof (widget as any).sessionContext?.kernelChanged?.connect === 'function';
}

export class NotebookScope {
  constructor(labShell: ILabShell | null) {
    if (labShell) {
      labShell.currentChanged.connect((_, change) => this._follow(change.newValue), this);
      this._follow(labShell.currentWidget);
    }
  }

  /** Emitted when the notebook, or its kernel, changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The kernel id of the current notebook (null: no notebook, or no kernel yet). */
  get kernelId(): string | null {
    return this._widget?.sessionContext.session?.kernel?.id ?? null;
  }

  /** The current notebook's path ("" when there is none). */
  get path(): string {
    return this._widget?.sessionContext.path ?? '';
  }

  /** True when `kernelId` is the current notebook's kernel. */
  owns(kernelId: string | null): boolean {
    return !!kernelId && kernelId === this.kernelId;
  }

  private _follow(widget: Widget | null): void {
    if (!hasKernelContext(widget) || widget === this._widget) {
      return; // a file browser or an editor keeps the notebook we had
    }
    if (this._widget) {
      this._widget.sessionContext.kernelChanged.disconnect(this._emit, this);
      this._widget.disposed.disconnect(this._forget, this);
    }
    this._widget = widget;
    widget.sessionContext.kernelChanged.connect(this._emit, this);
    widget.disposed.connect(this._forget, this);
    this._emit();
  }

  private _forget(): void {
    this._widget = null;
    this._emit();
  }

  private _emit(): void {
    this._changed.emit();
  }

  private _widget: IKernelWidget | null = null;
  private _changed = new Signal<this, void>(this);
}
