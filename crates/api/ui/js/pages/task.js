// One task: its request, where and how often it ran, its timing, why it is where it is, its
// logs followed live (GET /v1/tasks/{id}/logs?follow=true, Server-Sent Events), and cancel.

import { ApiError } from '../api.js';
import { fill, h, throttle } from '../dom.js';
import { duration, num, since, statusBadge, time } from '../format.js';
import { readSse } from '../sse.js';

export function taskPage(ctx, id) {
  const path = `/v1/tasks/${encodeURIComponent(id)}`;
  const head = h('div', { class: 'row' });
  const why = h('div');
  const details = h('div');
  const attempts = h('div');
  const logs = h('pre', { class: 'logs', 'data-testid': 'logs', 'aria-live': 'polite' });
  const logState = h('span', { class: 'muted', 'data-testid': 'log-state' }, 'connecting…');
  const actionError = h('p', { class: 'error', role: 'alert', hidden: true });
  const el = h('section', { 'data-testid': 'task-detail', 'data-task-id': id },
    h('p', {}, h('a', { href: '#/tasks' }, '← Tasks')),
    head, actionError, why, details, attempts,
    h('div', { class: 'panel' }, h('div', { class: 'row' }, h('h2', {}, 'Logs'), logState), logs));
  let task = null;
  let closed = false;
  let follow = null;

  async function load() {
    try {
      task = await ctx.api.get(path);
      draw();
      loadAttempts();
    } catch (e) {
      fill(head, h('p', { class: 'error' }, `Could not load ${id}: ${e.message}`));
    }
  }

  function draw() {
    const t = task;
    const cancellable = !['completed', 'failed', 'cancelled'].includes(t.status);
    fill(head,
      h('h1', { class: 'mono' }, t.task_id), h('span', { 'data-testid': 'task-status' }, statusBadge(t.status)),
      t.cancel_requested && cancellable ? h('span', { class: 'muted' }, 'cancel requested') : null,
      h('span', { class: 'spacer' }),
      cancellable ? h('button', { type: 'button', class: 'danger', id: 'cancel', onclick: cancel, disabled: t.cancel_requested }, 'Cancel') : null);
    const reason = t.status_reason || t.error;
    fill(why, reason
      ? h('p', { class: 'why', 'data-testid': 'task-reason' },
        h('strong', {}, ['pending', 'queued'].includes(t.status) ? `Why ${t.status}: ` : t.error ? 'Error: ' : 'Reason: '), reason)
      : null);
    const ran = t.started_at ? since(t.started_at, t.completed_at) : null;
    fill(details, h('div', { class: 'grid wide' },
      h('div', { class: 'panel' }, h('h2', {}, 'Request'), h('dl', { class: 'kv' },
        kv('image', h('span', { class: 'mono' }, t.docker_image)),
        kv('command', h('span', { class: 'mono' }, t.command ?? '(image default)')),
        kv('cpu', `${num(t.req_cpu)} cores`), kv('memory', `${num(t.req_memory)} GB`),
        kv('storage', `${num(t.req_storage)} GB`), kv('gpu', num(t.req_gpu, 0)),
        kv('priority', t.priority), kv('timeout', t.timeout_s ? `${t.timeout_s} s` : 'none'),
        kv('preemption', t.preempted_by
          ? h('span', { 'data-testid': 'task-preempted-by' }, 'being stopped for ',
            h('a', { class: 'mono', href: `#/tasks/${encodeURIComponent(t.preempted_by)}` }, t.preempted_by))
          : t.preemptible === false ? 'never (opted out)' : 'may be preempted by a higher priority'),
        kv('labels', Object.entries(t.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(', ') || '–'),
        kv('env', Object.keys(t.env ?? {}).join(', ') || '–'),
        kv('array', t.array_id
          ? h('a', { class: 'mono', href: `#/tasks?array=${encodeURIComponent(t.array_id)}` }, `${t.array_id} [${t.array_index}]`)
          : '–'),
        kv('after', (t.after ?? []).length === 0 ? '–' : h('span', { 'data-testid': 'task-after' }, (t.after ?? []).map((d, i) => [
          i > 0 ? ', ' : '',
          d.task_id
            ? h('a', { class: 'mono', href: `#/tasks/${encodeURIComponent(d.task_id)}` }, d.task_id)
            : h('a', { class: 'mono', href: `#/tasks?array=${encodeURIComponent(d.array_id)}` }, d.array_id),
          ` (${d.condition})`,
        ]), t.awaiting_dependencies ? ' — waiting' : '')),
        kv('user', t.user_id))),
      h('div', { class: 'panel' }, h('h2', {}, 'Timing'), h('dl', { class: 'kv' },
        kv('created', time(t.created_at)), kv('started', time(t.started_at)), kv('finished', time(t.completed_at)),
        kv('waited', duration(since(t.created_at, t.started_at ?? t.completed_at))),
        kv('ran', ran === null ? '–' : duration(ran)),
        kv('attempts', `${t.attempts} of at most ${t.max_attempts}`),
        kv('exit code', t.exit_code ?? '–'),
        kv('updated', time(t.updated_at))))));
  }

  async function loadAttempts() {
    try {
      const list = await ctx.api.get(`${path}/assignments`);
      fill(attempts, h('div', { class: 'panel', 'data-testid': 'assignments' }, h('h2', {}, 'Assignments'),
        list.assignments.length === 0 ? h('p', { class: 'muted' }, 'Not placed yet.') : h('table', {},
          h('thead', {}, h('tr', {}, ['Attempt', 'Worker', 'Assigned', 'Reservation', 'Released'].map((x) => h('th', {}, x)))),
          h('tbody', {}, list.assignments.map((a) => h('tr', {},
            h('td', {}, a.attempt), h('td', { class: 'mono' }, a.worker_id), h('td', {}, time(a.assigned_at)),
            h('td', {}, `${num(a.req_cpu)} cpu · ${num(a.req_memory)} GB · ${num(a.req_storage)} GB disk · ${num(a.req_gpu, 0)} gpu`),
            h('td', {}, a.released ? time(a.released_at) : 'held')))))));
    } catch (e) {
      fill(attempts, h('p', { class: 'error' }, `Assignments: ${e.message}`));
    }
  }

  function kv(key, value) {
    return [h('dt', {}, key), h('dd', {}, value)];
  }

  async function cancel() {
    actionError.hidden = true;
    try {
      task = await ctx.api.post(`${path}/cancel`);
      draw();
    } catch (e) {
      actionError.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : String(e);
      actionError.hidden = false;
    }
  }

  /** Follows the logs; a dropped stream starts again from the beginning (it replays). */
  async function followLogs() {
    let delay = 1000;
    while (!closed) {
      follow = new AbortController();
      try {
        const response = await ctx.api.get(`${path}/logs?follow=true`, {
          raw: true, signal: follow.signal, headers: { Accept: 'text/event-stream' },
        });
        logs.replaceChildren();
        logState.textContent = 'following';
        let ended = false;
        await readSse(response, (frame) => {
          const data = JSON.parse(frame.data);
          if (frame.type === 'log') {
            const span = h('span', { class: data.stream === 'stderr' ? 'stderr' : 'stdout' }, data.text);
            const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
            logs.append(span);
            if (atBottom) logs.scrollTop = logs.scrollHeight;
          } else if (frame.type === 'end') {
            ended = true;
            logState.textContent = `ended: ${data.status}${data.exit_code !== null && data.exit_code !== undefined ? `, exit code ${data.exit_code}` : ''}`;
            reload();
          }
        });
        if (ended) return;
      } catch (e) {
        if (closed || e.name === 'AbortError') return;
        logState.textContent = `log stream dropped (${e.message}); retrying`;
        if (e instanceof ApiError && e.status < 500 && e.status !== 0) return;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(10000, delay * 2);
    }
  }

  const reload = throttle(load, 150);
  const unsubscribe = ctx.live.subscribe((event) => {
    if (event.type === 'resync' || (event.topic === 'task' && event.task_id === id)) reload();
  });
  load();
  followLogs();
  return {
    el,
    destroy() {
      closed = true;
      follow?.abort();
      unsubscribe();
      reload.cancel();
    },
  };
}
