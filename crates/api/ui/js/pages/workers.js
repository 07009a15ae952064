// Workers (admin): one row per worker with its allocation per resource, heartbeat age,
// labels, running tasks, drain and undrain. The list is virtualised: only the rows in view
// are in the DOM, so a thousand workers scroll as fast as ten.

import { ApiError } from '../api.js';
import { fill, h, throttle } from '../dom.js';
import { bar, RESOURCES } from '../format.js';

const ROW_PX = 40;
const OVERSCAN = 8;
/** Heartbeats raise no events: ages are refreshed from the listing this often. */
const HEARTBEAT_REFRESH_MS = 15000;

export function workersPage(ctx) {
  let workers = []; // sorted by id
  let shown = []; // after the text filter
  const rendered = new Map(); // index -> row element

  const search = h('input', { id: 'worker-filter', placeholder: 'filter: id or label', 'aria-label': 'Filter workers' });
  const summary = h('span', { class: 'muted', 'data-testid': 'worker-summary' });
  const problem = h('p', { class: 'error', role: 'alert', hidden: true });
  const rowsBox = h('div', { class: 'spacer-rows' });
  const list = h('div', { class: 'vlist', 'data-testid': 'worker-list' }, rowsBox);
  const el = h('section', {},
    h('div', { class: 'row' }, h('h1', {}, 'Workers'), summary, h('span', { class: 'spacer' }), search,
      h('button', { type: 'button', class: 'secondary', onclick: () => load() }, 'Refresh')),
    problem,
    h('div', { class: 'whead' }, ['Worker', 'State', ...RESOURCES.map((r) => r.label), 'Heartbeat', 'Running', 'Labels', ''].map((t) => h('div', {}, t))),
    list,
    h('p', { class: 'muted' }, `Heartbeat ages are refreshed every ${HEARTBEAT_REFRESH_MS / 1000} s; everything else changes as events arrive.`));

  function state(w) {
    if (!w.is_active) return h('span', { class: 'badge lost' }, 'lost');
    if (w.draining) return h('span', { class: 'badge draining' }, 'draining');
    return h('span', { class: 'badge up' }, 'active');
  }

  function age(w) {
    const s = Math.max(0, Math.round(Date.now() / 1000 - w.last_heartbeat));
    return s < 120 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
  }

  function rowFor(w, index) {
    const action = w.draining
      ? h('button', { type: 'button', class: 'secondary', onclick: () => act(w, 'undrain') }, 'Undrain')
      : h('button', { type: 'button', class: 'secondary', onclick: () => act(w, 'drain') }, 'Drain');
    const row = h('div', { class: 'wrow', 'data-worker-id': w.worker_id },
      h('div', { class: 'id mono', title: w.worker_id }, w.worker_id),
      h('div', { class: 'state' }, state(w)),
      RESOURCES.map((r) => bar(w[`allocated_${r.key}`], w[`total_${r.key}`])),
      h('div', { class: 'age' }, age(w)),
      h('div', {}, w.usage?.running_tasks ?? '–'),
      h('div', { class: 'chips' }, Object.entries(w.labels ?? {}).map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`))),
      h('div', {}, action));
    row.style.top = `${index * ROW_PX}px`;
    return row;
  }

  /** Puts in the DOM the rows in view (and a few around them), and only those. */
  function paint(force = false) {
    rowsBox.style.height = `${shown.length * ROW_PX}px`;
    const first = Math.max(0, Math.floor(list.scrollTop / ROW_PX) - OVERSCAN);
    const last = Math.min(shown.length, Math.ceil((list.scrollTop + (list.clientHeight || 600)) / ROW_PX) + OVERSCAN);
    for (const [i, row] of rendered) {
      if (force || i < first || i >= last) {
        row.remove();
        rendered.delete(i);
      }
    }
    for (let i = first; i < last; i++) {
      if (rendered.has(i)) continue;
      const row = rowFor(shown[i], i);
      rendered.set(i, row);
      rowsBox.append(row);
    }
  }

  function refilter() {
    const q = search.value.trim().toLowerCase();
    shown = !q ? workers : workers.filter((w) => w.worker_id.toLowerCase().includes(q)
      || Object.entries(w.labels ?? {}).some(([k, v]) => `${k}=${v}`.toLowerCase().includes(q)));
    const active = workers.filter((w) => w.is_active).length;
    const draining = workers.filter((w) => w.draining).length;
    summary.textContent = `${workers.length} workers · ${active} active · ${draining} draining` + (shown.length !== workers.length ? ` · ${shown.length} shown` : '');
    paint(true);
  }

  async function load() {
    try {
      const answer = await ctx.api.get('/v1/workers');
      workers = answer.workers.sort((a, b) => a.worker_id.localeCompare(b.worker_id));
      problem.hidden = true;
      refilter();
    } catch (e) {
      problem.textContent = `Could not load the workers: ${e.message}`;
      problem.hidden = false;
    }
  }

  async function act(w, what) {
    problem.hidden = true;
    try {
      upsert(await ctx.api.post(`/v1/workers/${encodeURIComponent(w.worker_id)}/${what}`));
    } catch (e) {
      problem.textContent = e instanceof ApiError ? `${what} ${w.worker_id}: ${e.message} (${e.code})` : String(e);
      problem.hidden = false;
    }
  }

  function upsert(answer) {
    const w = answer.worker ?? answer;
    const at = workers.findIndex((x) => x.worker_id === w.worker_id);
    if (at >= 0) {
      workers[at] = w;
    } else {
      workers.push(w);
      workers.sort((a, b) => a.worker_id.localeCompare(b.worker_id));
    }
    refilter();
  }

  // Workers changed by events, re-read a batch at a time.
  const dirty = new Set();
  // A busy cluster changes many workers at once: then the whole listing, at most every 2 s.
  const reloadAll = throttle(load, 2000);
  const refresh = throttle(async () => {
    const ids = [...dirty];
    dirty.clear();
    if (ids.length > 20) return reloadAll();
    for (const id of ids) {
      try {
        upsert(await ctx.api.get(`/v1/workers/${encodeURIComponent(id)}`));
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) {
          workers = workers.filter((w) => w.worker_id !== id);
          refilter();
        }
      }
    }
  }, 200);

  const unsubscribe = ctx.live.subscribe((event) => {
    if (event.type === 'resync') return load();
    // Worker events, and task changes that reserve or release a worker's resources.
    const id = event.worker_id ?? event.data?.worker_id;
    if (!id || !(event.topic === 'worker' || event.topic === 'task')) return;
    dirty.add(id);
    refresh();
  });
  list.addEventListener('scroll', () => paint());
  search.addEventListener('input', throttle(refilter, 100));
  const ticker = setInterval(() => {
    for (const [i, row] of rendered) {
      const w = shown[i];
      if (w) row.querySelector('.age').textContent = age(w);
    }
  }, 1000);
  const heartbeats = setInterval(load, HEARTBEAT_REFRESH_MS);
  load();
  return { el, destroy() { unsubscribe(); clearInterval(ticker); clearInterval(heartbeats); refresh.cancel(); reloadAll.cancel(); } };
}
