// Submit: the task form. The API validates; its message is shown beside the form and the
// field it names is marked.

import { ApiError } from '../api.js';
import { h } from '../dom.js';

const FIELDS = [
  { name: 'docker_image', label: 'Image', value: 'busybox:1.36', required: true },
  { name: 'command', label: 'Command', placeholder: 'sh -c "echo hello"' },
  { name: 'req_cpu', label: 'CPU (cores)', value: '1', type: 'number' },
  { name: 'req_memory', label: 'Memory (GB)', value: '0.5', type: 'number' },
  { name: 'req_storage', label: 'Storage (GB)', value: '0', type: 'number' },
  { name: 'req_gpu', label: 'GPU (devices)', value: '0', type: 'number' },
  { name: 'priority', label: 'Priority', value: '0', type: 'number', integer: true },
  { name: 'timeout_s', label: 'Timeout (s)', placeholder: 'none', type: 'number', integer: true },
];

export function submitPage(ctx) {
  const inputs = new Map();
  const error = h('p', { class: 'error full', role: 'alert', hidden: true, 'data-testid': 'submit-error' });
  const button = h('button', { type: 'submit' }, 'Submit');
  const form = h('form', { class: 'panel stack', id: 'submit-form', novalidate: true },
    FIELDS.map((f) => {
      // Free text, not type=number: the API's message, not the browser's, says what is wrong.
      const input = h('input', {
        id: `f-${f.name}`, name: f.name, value: f.value ?? '', placeholder: f.placeholder ?? '',
        inputmode: f.type === 'number' ? 'decimal' : null, autocomplete: 'off',
      });
      inputs.set(f.name, input);
      return [h('label', { for: input.id }, f.label), input];
    }),
    h('div', { class: 'full row' }, button),
    error);
  // One key per filled-in form: a double click or a retry submits the task once.
  let key = newKey();
  form.addEventListener('input', () => { key = newKey(); });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.hidden = true;
    for (const input of inputs.values()) input.removeAttribute('aria-invalid');
    const spec = {};
    for (const f of FIELDS) {
      const raw = inputs.get(f.name).value.trim();
      if (raw === '') continue;
      // A value that is not a number goes as text: the API names the field and the rule.
      spec[f.name] = f.type === 'number' && raw !== '' && !Number.isNaN(Number(raw)) ? Number(raw) : raw;
    }
    button.disabled = true;
    try {
      const task = await ctx.api.post('/v1/tasks', spec, { headers: { 'Idempotency-Key': key } });
      key = newKey();
      location.hash = `#/tasks/${encodeURIComponent(task.task_id)}`;
    } catch (e) {
      error.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : String(e);
      error.hidden = false;
      const field = FIELDS.find((f) => e.message?.startsWith(f.name) || e.message?.includes(`\`${f.name}\``));
      if (field) inputs.get(field.name).setAttribute('aria-invalid', 'true');
    } finally {
      button.disabled = false;
    }
  });

  const el = h('section', {}, h('h1', {}, 'Submit a task'),
    h('p', { class: 'muted' }, 'Resources in cores, GB (2^30 bytes) and whole GPUs. The command runs as the image\'s entrypoint arguments, split like a shell would.'),
    form);
  return { el };
}

/** 128 random bits in hex (crypto.randomUUID needs a secure context; this does not). */
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `ui-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}
