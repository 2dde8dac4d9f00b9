/**
 * supermachine-jupyter: a left-sidebar panel, "MicroVMs", listing every microVM that
 * supermachine_jupyter runs on this server's machine (from any kernel), with Stop and
 * balloon controls. Data comes from the server extension (`supermachine/api/vms`).
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';

import { vmIcon } from './icon';
import { VmListModel } from './model';
import { VmSidebar } from './panel';

export const PANEL_ID = 'supermachine-vms';
const COMMAND_SHOW = 'supermachine:show-vms';
/** Milliseconds between refreshes while the panel is visible. */
const REFRESH_MS = 2000;

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'supermachine-jupyter:sidebar',
  description: 'A sidebar listing the running microVMs, with Stop and balloon controls.',
  autoStart: true,
  optional: [ILabShell, ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    let panel: VmSidebar | null = null;
    const model = new VmListModel({
      refreshRate: REFRESH_MS,
      // poll only while someone can see the panel
      standby: () => !panel || !panel.isVisible
    });
    panel = new VmSidebar({ model });
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
  }
};

export default plugin;
