/**
 * supermachine-jupyter: a left-sidebar panel, "MicroVMs", listing the microVMs that
 * supermachine_jupyter runs on this server's machine — the current notebook's by default,
 * every kernel's on request — with Stop and balloon controls, and a status-bar item with
 * the current notebook's VMs and their host memory. Data comes from the server extension
 * (`supermachine/api/vms`). A second plugin highlights `%%vm` cell bodies as shell.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';

import { vmIcon } from './icon';
import { VmListModel } from './model';
import { VmSidebar } from './panel';
import { NotebookScope } from './scope';
import { VmStatusItem } from './statusbar';
import { vmCellHighlightPlugin } from './vmcell';

export const PANEL_ID = 'supermachine-vms';
const COMMAND_SHOW = 'supermachine:show-vms';
export const STATUS_ITEM_ID = 'supermachine-jupyter:status';
/** Milliseconds between refreshes: short, so a VM shows up while it boots. */
const REFRESH_MS = 1000;

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'supermachine-jupyter:sidebar',
  description: 'A sidebar listing the running microVMs, with Stop and balloon controls.',
  autoStart: true,
  optional: [ILabShell, ILayoutRestorer, ICommandPalette, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null
  ) => {
    let panel: VmSidebar | null = null;
    const scope = new NotebookScope(labShell);
    const model = new VmListModel({
      refreshRate: REFRESH_MS,
      // poll only while someone can see the panel or the status-bar item
      standby: () => (!panel || !panel.isVisible) && !statusBar
    });
    panel = new VmSidebar({ model, scope });
    panel.id = PANEL_ID;
    panel.title.icon = vmIcon;
    panel.title.caption = 'MicroVMs';
    app.shell.add(panel, 'left', { rank: 650, type: 'MicroVMs' });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
    }
    app.commands.addCommand(COMMAND_SHOW, {
      label: 'Show MicroVMs',
      caption: 'Show the running microVMs',
      icon: vmIcon,
      execute: () => {
        if (labShell) {
          labShell.activateById(PANEL_ID);
        } else {
          app.shell.activateById(PANEL_ID);
        }
      }
    });
    if (palette) {
      palette.addItem({ command: COMMAND_SHOW, category: 'MicroVMs' });
    }
    if (statusBar) {
      const item = new VmStatusItem({
        model,
        scope,
        onClick: () => void app.commands.execute(COMMAND_SHOW)
      });
      statusBar.registerStatusItem(STATUS_ITEM_ID, {
        item,
        align: 'left',
        rank: 10,
        // shown while a notebook (or console) with a kernel is the current document
        isActive: () => scope.path !== '',
        activeStateChanged: scope.changed
      });
    }
  }
};

export default [plugin, vmCellHighlightPlugin];
