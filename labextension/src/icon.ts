import { LabIcon } from '@jupyterlab/ui-components';

/** A chip in a box: the MicroVMs sidebar tab. Uses jp-icon3 so themes recolour it. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M4 3h16a1 1 0 0 1 1 1v12a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm1 2v10h14V5H5z"/>
    <path d="M8 7h8v6H8z"/>
    <path d="M7 19h10v2H7z"/>
  </g>
</svg>`;

export const vmIcon = new LabIcon({ name: 'supermachine-jupyter:vm', svgstr: svg });
