// Policies (admin): the versions of each policy with the one active per kind, failure
// counters, upload (progress streamed by the host), activate, roll back, and a dry run of a
// version against the current queue beside the active policy's decisions.

import { ApiError, request, withQuery } from '../api.js';
import { fill, h, throttle } from '../dom.js';
import { num, time } from '../format.js';
import { readSse } from '../sse.js';

export function policiesPage(ctx) {
  const activeBox = h('div', { class: 'grid wide', 'data-testid': 'active-policies' });
  const versionsBox = h('div', { 'data-testid': 'policy-versions' });
  const problem = h('p', { class: 'error', role: 'alert', hidden: true });
  const dryRunBox = h('div', { 'data-testid': 'dry-run' });
  const el = h('section', {},
    h('div', { class: 'row' }, h('h1', {}, 'Policies'), h('span', { class: 'spacer' }),
      h('button', { type: 'button', class: 'secondary', onclick: () => load() }, 'Refresh')),
    problem, activeBox, uploadForm(), versionsBox, dryRunBox);

  function fail(e, what) {
    problem.textContent = e instanceof ApiError ? `${what}: ${e.message} (${e.code})` : `${what}: ${e}`;
    problem.hidden = false;
  }

  async function load() {
    try {
      draw(await ctx.api.get('/v1/policies'));
    } catch (e) {
      fail(e, 'Could not load the policies');
    }
  }

  function draw(list) {
    fill(activeBox, ['placement', 'admission'].map((kind) => {
      const a = list.active[kind];
      return h('div', { class: 'tile', 'data-kind': kind },
        h('div', { class: 'k' }, `active ${kind} policy`),
        h('div', { class: 'n mono', 'data-testid': `active-${kind}` }, a ? `${a.name}@${a.version}` : kind === 'placement' ? 'native best-fit' : 'none (accept all)'),
        a ? h('div', { class: 'muted' }, `since ${time(a.activated_at)} by ${a.activated_by}`) : null,
        a?.previous ? h('button', { type: 'button', class: 'secondary', onclick: () => rollback(kind) },
          `Roll back to ${a.previous[0]}@${a.previous[1]}`) : null);
    }));
    const byName = new Map();
    for (const v of list.versions) {
      if (!byName.has(v.name)) byName.set(v.name, []);
      byName.get(v.name).push(v);
    }
    if (byName.size === 0) {
      fill(versionsBox, h('p', { class: 'muted panel' }, 'No policy uploaded yet: the host places with its native best-fit.'));
      return;
    }
    fill(versionsBox, [...byName].map(([name, versions]) => h('div', { class: 'panel', 'data-policy': name },
      h('h2', { class: 'mono' }, name),
      h('table', {},
        h('thead', {}, h('tr', {}, ['Version', 'Kind', 'State', 'Evaluations', 'Failures (in a row / all)', 'Size', 'Uploaded', ''].map((t) => h('th', {}, t)))),
        h('tbody', {}, versions.map((v) => h('tr', { 'data-version': v.version },
          h('td', { class: 'mono' }, v.version),
          h('td', {}, v.kind),
          h('td', {},
            v.active ? h('span', { class: 'badge active' }, 'active') : null, ' ',
            v.deactivated ? h('span', { class: 'badge deactivated', title: 'deactivated after repeated failures' }, 'deactivated') : null,
            v.load_error ? h('span', { class: 'badge error', title: v.load_error }, 'load error') : null,
            !v.loaded && !v.load_error ? h('span', { class: 'muted' }, 'not loaded here') : null),
          h('td', {}, num(v.evaluations, 0)),
          h('td', {}, `${num(v.consecutive_failures, 0)} / ${num(v.total_failures, 0)}`),
          h('td', {}, `${num(v.size_bytes / 1024, 0)} KiB`),
          h('td', {}, `${time(v.uploaded_at)} by ${v.uploaded_by}`),
          h('td', { class: 'row' },
            v.active ? null : h('button', { type: 'button', onclick: () => activate(v) }, 'Activate'),
            h('button', { type: 'button', class: 'secondary', onclick: () => dryRun(v) }, 'Dry run')))))))));
  }

  async function activate(v) {
    problem.hidden = true;
    try {
      await ctx.api.post(`/v1/policies/${encodeURIComponent(v.name)}/activate`, { version: v.version });
      await load();
    } catch (e) {
      fail(e, `Activating ${v.name}@${v.version}`);
    }
  }

  async function rollback(kind) {
    problem.hidden = true;
    try {
      await ctx.api.post('/v1/policies/rollback', { kind });
      await load();
    } catch (e) {
      fail(e, `Rolling back the ${kind} policy`);
    }
  }

  async function dryRun(v) {
    fill(dryRunBox, h('p', { class: 'muted panel' }, `Dry run of ${v.name}@${v.version}…`));
    try {
      const r = await ctx.api.post(`/v1/policies/${encodeURIComponent(v.name)}/dry-run`, { version: v.version });
      fill(dryRunBox, h('div', { class: 'panel' },
        h('h2', {}, `Dry run: ${r.name}@${r.version} beside ${r.compared_with}`),
        h('p', { class: 'muted' }, `${r.tasks.length} tasks of the current queue, ${r.differing} decided differently · `,
          `candidate ${num(r.candidate_ms)} ms, active ${num(r.active_ms)} ms`),
        r.active_failed ? h('p', { class: 'error' }, `The active policy failed on this input (${r.active_failed}); its column shows the fallback's decisions.`) : null,
        r.tasks.length === 0 ? h('p', { class: 'muted' }, 'The queue is empty: nothing to decide.') : h('table', {},
          h('thead', {}, h('tr', {}, h('th', {}, 'Task'), h('th', {}, `${r.name}@${r.version}`), h('th', {}, r.compared_with))),
          h('tbody', {}, r.tasks.map((t) => h('tr', { class: t.differs ? 'differs' : '' },
            h('td', {}, h('a', { class: 'mono', href: `#/tasks/${encodeURIComponent(t.task_id)}` }, t.task_id)),
            h('td', {}, decision(t.candidate)), h('td', {}, decision(t.active))))))));
    } catch (e) {
      fill(dryRunBox, h('p', { class: 'error panel' }, `Dry run of ${v.name}@${v.version}: ${e.message} (${e.code ?? 'error'})`));
    }
  }

  function decision(d) {
    return [h('strong', {}, d.decision), d.worker_id ? h('span', { class: 'mono' }, ` → ${d.worker_id}`) : null,
      d.reason ? h('div', { class: 'muted' }, d.reason) : null];
  }

  function uploadForm() {
    const file = h('input', { type: 'file', id: 'policy-file', accept: '.wasm,application/wasm', required: true });
    const name = h('input', { id: 'policy-name', required: true, placeholder: 'first-fit', pattern: '[a-z0-9][a-z0-9._\\-]{0,62}' });
    const version = h('input', { id: 'policy-version', required: true, placeholder: '1.0.0' });
    const kind = h('select', { id: 'policy-kind' }, h('option', { value: '' }, 'from the component'),
      h('option', { value: 'placement' }, 'placement'), h('option', { value: 'admission' }, 'admission'));
    const config = h('textarea', { id: 'policy-config', rows: 2, placeholder: '{}' });
    const progress = h('p', { class: 'muted', 'data-testid': 'upload-progress' });
    const error = h('p', { class: 'error', role: 'alert', hidden: true, 'data-testid': 'upload-error' });
    const submit = h('button', { type: 'submit' }, 'Upload');
    file.addEventListener('change', () => {
      const f = file.files[0];
      if (f && !name.value) name.value = f.name.replace(/\.wasm$/, '').toLowerCase().replace(/[^a-z0-9._-]/g, '-');
    });
    const form = h('form', { class: 'panel stack', id: 'policy-upload' },
      h('h2', { class: 'full' }, 'Upload a version'),
      h('label', { for: 'policy-file' }, 'Component (.wasm)'), file,
      h('label', { for: 'policy-name' }, 'Name'), name,
      h('label', { for: 'policy-version' }, 'Version'), version,
      h('label', { for: 'policy-kind' }, 'Kind'), kind,
      h('label', { for: 'policy-config' }, 'Config (JSON)'), config,
      h('div', { class: 'full row' }, submit, progress), h('div', { class: 'full' }, error));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.hidden = true;
      submit.disabled = true;
      progress.textContent = 'Sending…';
      try {
        const path = withQuery('/v1/policies', { name: name.value.trim(), version: version.value.trim(), kind: kind.value, config: config.value.trim() });
        // Progress as the host compiles and validates it (a large guest takes seconds).
        const response = await request('POST', path, {
          raw: true, body: file.files[0], headers: { 'Content-Type': 'application/wasm', Accept: 'text/event-stream' },
        });
        let outcome = null;
        await readSse(response, (frame) => {
          const data = JSON.parse(frame.data);
          if (frame.type === 'progress') progress.textContent = `${data.stage}… (${num(data.elapsed_ms / 1000, 1)} s)`;
          else outcome = { type: frame.type, data };
        });
        if (outcome?.type === 'stored') {
          const p = outcome.data.policy;
          form.reset();
          progress.textContent = `Stored ${p.name}@${p.version} (${outcome.data.kind}; compiled in ${num(outcome.data.compile_ms, 0)} ms)`;
          await load();
        } else {
          const e = outcome?.data?.error;
          throw new ApiError(422, e?.code ?? 'upload_failed', e?.message ?? 'the upload ended without an answer');
        }
      } catch (e) {
        progress.textContent = '';
        error.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : String(e);
        error.hidden = false;
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  const reload = throttle(load, 250);
  const unsubscribe = ctx.live.subscribe((event) => {
    if (event.type === 'resync' || event.topic === 'policy') reload();
  });
  load();
  return { el, destroy() { unsubscribe(); reload.cancel(); } };
}
