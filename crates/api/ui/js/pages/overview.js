// Overview: the cluster at a glance, from GET /v1/overview, reloaded when an event says
// something changed (or every 10 s while the event stream is down).

import { fill, h, throttle } from '../dom.js';
import { bar, num, RESOURCES, TASK_STATES, time } from '../format.js';

const FALLBACK_REFRESH_MS = 10000;
// The host answers /v1/overview from a sample it keeps for 250 ms: an answer sampled before
// the event that asked for it is read again shortly (cheap while the sample is cached), a few
// times at most, so that the change shows as soon as the host has sampled it.
const STALE_RETRY_MS = 80;
const STALE_RETRIES = 8;

export function overviewPage(ctx) {
  const body = h('div', { 'data-testid': 'overview' }, h('p', { class: 'muted' }, 'Loading…'));
  const el = h('section', {}, h('h1', {}, 'Overview'), body);
  let timer = null;
  let newestEventAt = 0;
  let again = null;
  let retries = 0;

  async function load() {
    try {
      const o = await ctx.api.get('/v1/overview');
      draw(o);
      if (Date.parse(o.generated_at) >= newestEventAt) {
        retries = 0;
      } else if (!again && retries < STALE_RETRIES) {
        retries += 1;
        again = setTimeout(() => { again = null; load(); }, STALE_RETRY_MS);
      }
    } catch (e) {
      fill(body, h('p', { class: 'error' }, `Could not load the overview: ${e.message}`));
    }
  }

  function draw(o) {
    const policy = (p, none) => (p ? `${p.name}@${p.version}` : none);
    fill(body,
      h('div', { class: 'panel' },
        h('h2', {}, 'Capacity and allocation (active workers)'),
        RESOURCES.map((r) => h('div', { class: 'resource', 'data-resource': r.key },
          h('strong', {}, r.label),
          bar(o.allocated?.[r.key] ?? 0, o.capacity?.[r.key] ?? 0, r.unit),
          h('span', { class: 'muted' }, `${num(o.capacity?.[r.key] - o.allocated?.[r.key])} ${r.unit} free`)))),
      h('h2', {}, 'Tasks by state'),
      h('div', { class: 'grid', 'data-testid': 'tasks-by-state' },
        TASK_STATES.map((s) => h('a', { class: 'tile', href: `#/tasks?status=${s}`, 'data-state': s },
          h('div', { class: 'n' }, num(o.tasks_by_state?.[s] ?? 0, 0)), h('div', { class: 'k' }, s)))),
      h('h2', {}, 'Scheduling'),
      h('div', { class: 'grid' },
        tile('queue depth', num(o.queue_depth, 0), 'queue-depth', 'pending + queued'),
        tile('placements / min', num(o.placements_last_minute, 0), 'placements', 'in the last minute'),
        tile('workers', num(o.workers?.total, 0), 'workers',
          `${num(o.workers?.active, 0)} active · ${num(o.workers?.draining, 0)} draining · ${num(o.workers?.lost, 0)} lost`),
        tile('placement policy', policy(o.active_policies?.placement, 'native best-fit'), 'placement-policy'),
        tile('admission policy', policy(o.active_policies?.admission, 'none (accept all)'), 'admission-policy')),
      h('p', { class: 'muted' }, `As of ${time(o.generated_at)}`));
  }

  function tile(label, value, testid, note) {
    return h('div', { class: 'tile', 'data-testid': testid },
      h('div', { class: testid.endsWith('-policy') ? 'n mono' : 'n' }, value), h('div', { class: 'k' }, label), note ? h('div', { class: 'muted' }, note) : null);
  }

  const reload = throttle(load, 250);
  const unsubscribe = ctx.live.subscribe((event) => {
    if (event.type === 'resync' || ['task', 'worker', 'policy'].includes(event.topic)) {
      newestEventAt = Math.max(newestEventAt, Date.parse(event.at) || 0);
      reload();
    }
  });
  // The fallback the banner tells of: numbers only, and only while the stream is down.
  const unwatch = ctx.live.onStatus((status) => {
    clearInterval(timer);
    timer = status === 'live' ? null : setInterval(load, FALLBACK_REFRESH_MS);
    if (status === 'live') reload();
  });
  load();
  return {
    el,
    destroy() {
      unsubscribe();
      unwatch();
      clearInterval(timer);
      clearTimeout(again);
      reload.cancel();
    },
  };
}
