// Tasks: newest first, filtered by state (and by user, for admins), a page at a time with the
// API's cursor. Rows change state in place as task events arrive; new tasks appear on the
// first page. The tasks of one array that follow each other on a page are one row, which
// opens the array: its tasks, its counts by state, and a cancel for all of it.

import { ApiError, withQuery } from '../api.js';
import { fill, h, throttle } from '../dom.js';
import { num, statusBadge, TASK_STATES, time } from '../format.js';

const PAGE_SIZE = 50;

export function tasksPage(ctx, params) {
  const filter = {
    status: params.get('status') ?? '',
    user_id: params.get('user') ?? '',
    array_id: params.get('array') ?? '',
  };
  const cursors = [null]; // cursors[i]: the cursor of page i
  let page = 0;
  let nextCursor = null;
  let rows = new Map(); // task_id -> {tr, task}

  const status = h('select', { id: 'filter-status', 'aria-label': 'State' },
    h('option', { value: '' }, 'all states'), TASK_STATES.map((s) => h('option', { value: s }, s)));
  status.value = filter.status;
  const user = ctx.admin ? h('input', { id: 'filter-user', placeholder: 'user id', value: filter.user_id, 'aria-label': 'User' }) : null;
  const apply = h('form', { class: 'row panel', id: 'task-filters' },
    h('label', {}, 'State ', status), user ? h('label', {}, 'User ', user) : null,
    h('button', { type: 'submit' }, 'Filter'),
    h('span', { class: 'spacer' }),
    h('button', { type: 'button', class: 'secondary', onclick: () => load() }, 'Refresh'));
  apply.addEventListener('submit', (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set('status', status.value);
    if (user?.value.trim()) q.set('user', user.value.trim());
    if (filter.array_id) q.set('array', filter.array_id);
    const hash = `#/tasks${q.toString() ? '?' + q : ''}`;
    if (location.hash === hash) load();
    else location.hash = hash;
  });

  const tbody = h('tbody', { 'data-testid': 'task-rows' });
  const message = h('p', { class: 'muted' });
  const prev = h('button', { type: 'button', class: 'secondary', disabled: true, onclick: () => go(page - 1) }, '← Newer');
  const next = h('button', { type: 'button', class: 'secondary', disabled: true, onclick: () => go(page + 1) }, 'Older →');
  const where = h('span', { class: 'muted' });
  const arrayPanel = filter.array_id ? h('div', { class: 'panel', id: 'array-summary', 'data-testid': 'array-summary' }) : null;
  const el = h('section', {},
    h('div', { class: 'row' }, h('h1', {}, 'Tasks'), h('span', { class: 'spacer' }), h('a', { href: '#/submit' }, 'Submit a task')),
    apply,
    arrayPanel,
    h('div', { class: 'panel' },
      h('table', {},
        h('thead', {}, h('tr', {}, ['Task', 'User', 'Image', 'State', 'Priority', 'CPU', 'Memory GB', 'GPU', 'Attempts', 'Created'].map((t) => h('th', {}, t)))),
        tbody),
      message,
      h('div', { class: 'row' }, prev, next, where)));

  const arrayHref = (id) => `#/tasks?array=${encodeURIComponent(id)}`;

  // The array being shown: its tasks by state, and a cancel for every task that has not ended.
  async function loadArray() {
    if (!arrayPanel) return;
    try {
      const a = await ctx.api.get(`/v1/arrays/${encodeURIComponent(filter.array_id)}`);
      const states = TASK_STATES.filter((s) => a.tasks_by_state[s] > 0)
        .map((s) => `${num(a.tasks_by_state[s], 0)} ${s}`).join(', ');
      const cancel = h('button', { type: 'button', class: 'secondary', disabled: a.finished, onclick: async () => {
        if (!confirm(`Cancel every task of ${a.array_id} that has not ended?`)) return;
        try {
          await ctx.api.post(`/v1/arrays/${encodeURIComponent(a.array_id)}/cancel`, {});
        } catch (e) {
          alert(e instanceof ApiError ? `${e.message} (${e.code})` : String(e));
        }
        load();
      } }, 'Cancel the array');
      fill(arrayPanel, h('div', { class: 'row' },
        h('strong', {}, 'Array '), h('span', { class: 'mono' }, a.array_id),
        h('span', { 'data-testid': 'array-states' }, ` — ${num(a.count, 0)} tasks: ${states}${a.finished ? ' (finished)' : ''}`),
        h('span', { class: 'spacer' }), cancel, h('a', { href: '#/tasks' }, 'All tasks')));
    } catch (e) {
      fill(arrayPanel, h('p', { class: 'error' }, e instanceof ApiError ? `${e.message} (${e.code})` : String(e)));
    }
  }

  // Consecutive tasks of one array on the page, as one row that opens the array.
  function groupRow(arrayId, tasks) {
    const counts = new Map();
    for (const t of tasks) counts.set(t.status, (counts.get(t.status) ?? 0) + 1);
    const states = TASK_STATES.filter((s) => counts.has(s)).map((s) => `${counts.get(s)} ${s}`).join(', ');
    const first = tasks[0];
    return h('tr', { class: 'array-group', 'data-array-id': arrayId },
      h('td', {}, h('a', { class: 'mono', href: arrayHref(arrayId) }, `▸ ${arrayId}`)),
      h('td', {}, first.user_id),
      h('td', { class: 'mono' }, first.docker_image),
      h('td', { colspan: 6 }, `${tasks.length} tasks of this array here: ${states}`),
      h('td', {}, time(first.created_at)));
  }

  function rowsOf(tasks) {
    if (filter.array_id) return tasks.map(row);
    const out = [];
    for (let i = 0; i < tasks.length;) {
      const arrayId = tasks[i].array_id;
      let j = i + 1;
      while (arrayId && j < tasks.length && tasks[j].array_id === arrayId) j++;
      out.push(j - i > 1 ? groupRow(arrayId, tasks.slice(i, j)) : row(tasks[i]));
      i = j;
    }
    return out;
  }

  function row(task) {
    const arrayBadge = task.array_id
      ? h('a', { class: 'muted', href: arrayHref(task.array_id), title: task.array_id }, ` [${task.array_index}]`)
      : null;
    const tr = h('tr', { 'data-task-id': task.task_id },
      h('td', {}, h('a', { class: 'mono', href: `#/tasks/${encodeURIComponent(task.task_id)}` }, task.task_id), arrayBadge),
      h('td', {}, task.user_id),
      h('td', { class: 'mono' }, task.docker_image),
      h('td', { class: 'state' }, statusBadge(task.status)),
      h('td', {}, task.priority),
      h('td', {}, num(task.req_cpu)),
      h('td', { 'data-testid': 'req-memory' }, num(task.req_memory)),
      h('td', {}, num(task.req_gpu, 0)),
      h('td', { class: 'attempts' }, `${task.attempts}/${task.max_attempts}`),
      h('td', {}, time(task.created_at)));
    rows.set(task.task_id, { tr, task });
    return tr;
  }

  async function load() {
    message.textContent = 'Loading…';
    try {
      const list = await ctx.api.get(withQuery('/v1/tasks', { ...filter, limit: PAGE_SIZE, cursor: cursors[page] }));
      rows = new Map();
      fill(tbody, rowsOf(list.tasks));
      loadArray();
      nextCursor = list.next_cursor;
      message.textContent = list.tasks.length ? '' : 'No tasks.';
    } catch (e) {
      message.textContent = '';
      fill(tbody, h('tr', {}, h('td', { colspan: 10, class: 'error' }, e instanceof ApiError ? `${e.message} (${e.code})` : String(e))));
      nextCursor = null;
    }
    prev.disabled = page === 0;
    next.disabled = !nextCursor;
    where.textContent = `page ${page + 1}`;
  }

  function go(to) {
    if (to > page) {
      if (!nextCursor) return;
      cursors[to] = nextCursor;
    }
    page = Math.max(0, to);
    load();
  }

  // New tasks on the first page, fetched a few at a time.
  const fresh = new Set();
  const addFresh = throttle(async () => {
    const ids = [...fresh];
    fresh.clear();
    // A burst: one listing costs less than a read per task.
    if (ids.length > 10) return load();
    for (const id of ids) {
      if (rows.has(id)) continue;
      try {
        const task = await ctx.api.get(`/v1/tasks/${encodeURIComponent(id)}`);
        if (filter.status && task.status !== filter.status) continue;
        if (filter.user_id && task.user_id !== filter.user_id) continue;
        if (filter.array_id && task.array_id !== filter.array_id) continue;
        // Part of an array: the listing groups it.
        if (!filter.array_id && task.array_id) return load();
        tbody.prepend(row(task));
        message.textContent = '';
        while (tbody.children.length > PAGE_SIZE) {
          const last = tbody.lastElementChild;
          rows.delete(last.dataset.taskId);
          last.remove();
        }
      } catch { /* gone or not visible: nothing to show */ }
    }
  }, 200);

  const unsubscribe = ctx.live.subscribe((event) => {
    if (event.type === 'resync') return load();
    if (event.topic !== 'task') return;
    const known = rows.get(event.task_id);
    if (event.kind === 'state' && known) {
      const { status: now, attempts } = event.data;
      fill(known.tr.querySelector('.state'), statusBadge(now));
      if (attempts !== undefined) known.tr.querySelector('.attempts').textContent = `${attempts}/${known.task.max_attempts}`;
      // Kept in view (the page does not jump), marked as no longer matching the filter.
      known.tr.classList.toggle('stale', Boolean(filter.status) && now !== filter.status);
    } else if (event.kind === 'submitted' && page === 0 && !known) {
      fresh.add(event.task_id);
      addFresh();
    }
  });

  load();
  return { el, destroy() { unsubscribe(); addFresh.cancel(); } };
}
