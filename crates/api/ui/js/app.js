// The dashboard's shell: the login screen, the navigation, the hash router and the one
// live-event connection the pages share.

import { api, ApiError, onUnauthorized, session } from './api.js';
import { fill, h } from './dom.js';
import { LiveEvents } from './live.js';
import { overviewPage } from './pages/overview.js';
import { policiesPage } from './pages/policies.js';
import { submitPage } from './pages/submit.js';
import { taskPage } from './pages/task.js';
import { tasksPage } from './pages/tasks.js';
import { workersPage } from './pages/workers.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const sessionBar = document.getElementById('session');
const banner = document.getElementById('banner');
const liveStatus = document.getElementById('live-status');

const live = new LiveEvents();
let current = null; // the mounted page: {destroy?}
let ctx = null;

function routeOf(hash) {
  const [path, query = ''] = hash.replace(/^#\/?/, '').split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || 'overview', id: parts[1] ?? null, params: new URLSearchParams(query) };
}

const PAGES = {
  overview: overviewPage,
  tasks: (c, r) => (r.id ? taskPage(c, r.id) : tasksPage(c, r.params)),
  workers: workersPage,
  policies: policiesPage,
  submit: submitPage,
};

function mount() {
  if (!ctx) return;
  current?.destroy?.();
  current = null;
  const route = routeOf(location.hash);
  const make = PAGES[route.page];
  for (const a of nav.querySelectorAll('a')) a.classList.toggle('current', a.dataset.page === route.page);
  if (!make) {
    fill(main, h('p', { class: 'error' }, `No page "${route.page}".`));
    return;
  }
  const adminOnly = route.page === 'workers' || route.page === 'policies';
  if (adminOnly && !ctx.admin) {
    fill(main, h('p', { class: 'notice' }, 'This page needs an admin token.'));
    return;
  }
  current = make(ctx, route);
  fill(main, current.el);
}

function showLogin(message) {
  live.stop();
  ctx = null;
  current?.destroy?.();
  current = null;
  nav.hidden = true;
  sessionBar.hidden = true;
  banner.hidden = true;
  const token = h('input', {
    type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true,
    placeholder: 'cai_u_...', 'aria-label': 'API token',
  });
  const error = h('p', { class: 'error', id: 'login-error', role: 'alert', hidden: !message }, message ?? '');
  const form = h('form', { class: 'panel login', id: 'login' },
    h('h1', {}, 'Log in'),
    h('p', { class: 'muted' }, 'Paste an API token: a user or admin token from the host\'s tokens file, ',
      'or the admin token the host generated into its data directory (admin.token). ',
      'It stays in this tab (sessionStorage) and is sent as a bearer token.'),
    error,
    h('p', {}, token),
    h('button', { type: 'submit' }, 'Log in'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.hidden = true;
    try {
      await start(token.value.trim());
    } catch (e) {
      error.textContent = e instanceof ApiError ? `${e.message} (${e.code})` : String(e);
      error.hidden = false;
    }
  });
  fill(main, form);
  token.focus();
}

/** Checks the token, learns the role, and opens the dashboard. */
async function start(token) {
  // The policies listing answers admins only (403 for others, 401 for an unknown token); a
  // user's token is then proved by listing its tasks (a worker's token gets 403 there too).
  let admin = true;
  try {
    await api.get('/v1/policies', { token });
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 403) throw e;
    admin = false;
    await api.get('/v1/tasks?limit=1', { token });
  }
  session.token = token;
  ctx = { api, live, admin };
  for (const a of nav.querySelectorAll('[data-admin]')) a.hidden = !admin;
  document.getElementById('whoami').textContent = admin ? 'admin' : 'user';
  nav.hidden = false;
  sessionBar.hidden = false;
  live.start();
  if (!location.hash || location.hash === '#') location.hash = '#/overview';
  else mount();
}

live.onStatus((status, reason) => {
  liveStatus.className = `live live-${status === 'live' ? 'up' : status === 'down' ? 'down' : 'connecting'}`;
  liveStatus.textContent = status === 'live' ? 'live' : status === 'down' ? 'offline' : 'connecting';
  liveStatus.dataset.state = status;
  if (status === 'down' && ctx) {
    const wait = Math.max(0, Math.round((live.retryAt - Date.now()) / 1000));
    banner.textContent = `Live updates are down (${reason}); retrying in ${wait} s. Meanwhile the overview's ` +
      'numbers refresh every 10 s and other pages show what they loaded: use their Refresh buttons.';
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
});

onUnauthorized((message) => {
  session.clear();
  showLogin(`The host refused the token (401: ${message}). Log in again.`);
});

document.getElementById('logout').addEventListener('click', () => {
  session.clear();
  showLogin();
});
window.addEventListener('hashchange', mount);

if (session.token) {
  start(session.token).catch((e) => {
    if (e instanceof ApiError && e.status === 401) {
      session.clear();
      showLogin(`The host refused the token (401: ${e.message}). Log in again.`);
    } else {
      showLogin(`Could not open the dashboard: ${e.message}`);
    }
  });
} else {
  showLogin();
}
