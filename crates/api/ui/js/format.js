// How numbers, times and states read on screen.
import { h } from './dom.js';

export const RESOURCES = [
  { key: 'cpu', label: 'CPU', unit: 'cores' },
  { key: 'memory', label: 'Memory', unit: 'GB' },
  { key: 'storage', label: 'Storage', unit: 'GB' },
  { key: 'gpu', label: 'GPU', unit: 'devices' },
];

export const TASK_STATES = ['pending', 'queued', 'running', 'completed', 'failed', 'cancelled'];

export function num(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(x)) return '–';
  return Number(x).toLocaleString('en-US', { maximumFractionDigits: digits });
}

export function percent(used, total) {
  return total > 0 ? Math.min(100, Math.max(0, (100 * used) / total)) : 0;
}

/** A horizontal bar of `used` out of `total`, with its figures written on it. */
export function bar(used, total, unit = '') {
  const p = percent(used, total);
  const fill = h('div', { class: 'fill' });
  fill.style.width = `${p}%`; // CSSOM, allowed under the page's CSP (no style attributes)
  const cls = p >= 95 ? 'bar full' : p >= 75 ? 'bar hot' : 'bar';
  return h('div', { class: cls, title: `${num(used)} of ${num(total)} ${unit}` },
    fill, h('span', { class: 'label' }, `${num(used)} / ${num(total)}${unit ? ' ' + unit : ''}`));
}

export function statusBadge(status) {
  return h('span', { class: `badge status-${status}`, 'data-status': status }, status);
}

export function time(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** "3 s", "4 min 2 s", "1 h 5 min". */
export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function since(iso, until) {
  if (!iso) return null;
  return (until ? new Date(until).getTime() : Date.now()) - new Date(iso).getTime();
}
