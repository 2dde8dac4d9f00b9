/**
 * The polling model of the MicroVMs sidebar: the list of live VMs from the server
 * extension's REST API (`<base>/supermachine/api/vms`), refreshed by a Lumino Poll.
 * Views subscribe to `changed`; actions (stop, balloon) go through here too.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

export const API_PATH = 'supermachine/api';

/** A virtio-fs host directory mount with its counters. */
export interface IMount {
  host_path: string;
  tag: string;
  guest_path: string;
  read_only: boolean;
  dax: boolean;
  dax_note: string;
  ops: number;
  bytes_read: number;
  bytes_written: number;
}

/** A virtio-blk data volume. */
export interface IVolume {
  host_path: string;
  guest_path: string;
  serial: string;
  read_only: boolean;
  size_bytes?: number;
  used_bytes?: number;
  [key: string]: unknown;
}

/** Balloon size and the guest's memory statistics (Firecracker's names and units). */
export interface IBalloonStats {
  target_mib: number;
  actual_mib: number;
  target_pages: number;
  actual_pages: number;
  free_memory: number | null;
  total_memory: number | null;
  available_memory: number | null;
  disk_caches: number | null;
  major_faults: number | null;
  minor_faults: number | null;
  [key: string]: number | null;
}

/** One live VM as `GET supermachine/api/vms` returns it. */
export interface IVm {
  id: string;
  name: string;
  pid: number;
  engine: string;
  accel: string;
  reason: string;
  memory_mib: number;
  vcpus: number;
  balloon: boolean;
  started_at: number;
  uptime_s: number;
  kernel_id: string | null;
  notebook: string | null;
  /** True while the VM boots (listed from its launch on; no engine, devices or stats yet). */
  booting?: boolean;
  /** Host memory the VM holds resident (its engine's RSS), bytes; null when unknown. */
  host_memory_bytes?: number | null;
  /** "booting", "running", "stopping", "stopped", "failed" or "unknown". */
  state: string;
  failure: string | null;
  balloon_stats: IBalloonStats | null;
  mounts: IMount[];
  volumes: IVolume[];
  config: Record<string, unknown>;
}

export namespace VmListModel {
  export interface IOptions {
    /** Milliseconds between refreshes (default 1000). */
    refreshRate?: number;
    serverSettings?: ServerConnection.ISettings;
    /** Pause polling while this returns true (e.g. the panel is hidden). */
    standby?: () => boolean;
  }
}

/** An error with the message the server sent. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

export class VmListModel implements IDisposable {
  constructor(options: VmListModel.IOptions = {}) {
    this._settings = options.serverSettings ?? ServerConnection.makeSettings();
    const standby = options.standby;
    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: {
        interval: options.refreshRate ?? 1000,
        backoff: true,
        max: 10 * 1000
      },
      name: 'supermachine-jupyter:vms',
      standby: standby ? () => standby() || 'when-hidden' : 'when-hidden'
    });
  }

  /** Emitted after every refresh (successful or not) and after actions. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get vms(): ReadonlyArray<IVm> {
    return this._vms;
  }

  /** True once the first answer (or error) has arrived. */
  get loaded(): boolean {
    return this._loaded;
  }

  /** Why the last refresh failed, or null. */
  get error(): string | null {
    return this._error;
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Refresh now (the poll then goes on at its interval). */
  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  /** Stop a VM; resolves once it has stopped. */
  async stop(id: string): Promise<void> {
    try {
      await this._request(`vms/${encodeURIComponent(id)}/stop`, { method: 'POST' });
    } finally {
      void this.refresh();
    }
  }

  /** Set a VM's balloon size (MiB held away from the guest). */
  async setBalloon(id: string, targetMib: number): Promise<void> {
    await this._request(`vms/${encodeURIComponent(id)}/balloon`, {
      method: 'POST',
      body: JSON.stringify({ target_mib: targetMib })
    });
    void this.refresh();
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _fetch(): Promise<void> {
    try {
      const data = (await this._request('vms')) as { vms: IVm[] };
      this._vms = data.vms ?? [];
      this._error = null;
    } catch (err) {
      this._error = describeError(err);
      this._loaded = true;
      this._changed.emit();
      throw err; // let the poll back off
    }
    this._loaded = true;
    this._changed.emit();
  }

  private async _request(path: string, init: RequestInit = {}): Promise<unknown> {
    const url = URLExt.join(this._settings.baseUrl, API_PATH, path);
    const response = await ServerConnection.makeRequest(url, init, this._settings);
    const text = await response.text();
    let data: any = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const message =
        (data && data.message) ||
        (response.status === 404
          ? 'the supermachine_jupyter server extension is not enabled'
          : `${response.status} ${response.statusText}`);
      throw new ApiError(message, response.status);
    }
    return data;
  }

  private _settings: ServerConnection.ISettings;
  private _poll: Poll;
  private _vms: IVm[] = [];
  private _loaded = false;
  private _error: string | null = null;
  private _changed = new Signal<this, void>(this);
}

function describeError(err: unknown): string {
  if (err instanceof ApiError) {
    return err.message;
  }
  if (err instanceof Error) {
    return err.message;
  }
  return String(err);
}
