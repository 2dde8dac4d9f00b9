/**
 * Formatting helpers for the MicroVMs sidebar (no DOM, no state).
 */

const MIB = 1024 * 1024;

/** "512 MiB", "1.5 GiB". */
export function formatMiB(mib: number): string {
  if (mib >= 1024) {
    const gib = mib / 1024;
    return `${gib >= 10 ? gib.toFixed(0) : gib.toFixed(1)} GiB`;
  }
  return `${Math.round(mib)} MiB`;
}

/** Bytes as "12.3 MiB", "900 KiB", "17 B". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** Bytes to MiB (for bars). */
export function bytesToMiB(bytes: number): number {
  return bytes / MIB;
}

/** "45 s", "3 min 12 s", "2 h 5 min". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m} min ${s % 60} s`;
  }
  const h = Math.floor(m / 60);
  return `${h} h ${m % 60} min`;
}

/** "1 vCPU", "2 vCPUs". */
export function formatVcpus(n: number): string {
  return `${n} vCPU${n === 1 ? '' : 's'}`;
}

/** A percentage for a CSS width, clamped to [0, 100]. */
export function percent(part: number, whole: number): string {
  if (!(whole > 0)) {
    return '0%';
  }
  const p = Math.min(100, Math.max(0, (100 * part) / whole));
  return `${p.toFixed(2)}%`;
}
