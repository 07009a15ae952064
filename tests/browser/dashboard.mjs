// The dashboard in headless Chromium against a running host with a real worker. Run by
// tests/e2e/dashboard.rs (which starts the host); by hand:
//   CLOUDAI_URL=http://127.0.0.1:8080 CLOUDAI_ADMIN_TOKEN=... CLOUDAI_USER_TOKEN=... \
//   CLOUDAI_TEST_IMAGE=busybox:1.36 CLOUDAI_POLICY_WASM=.../first-fit.wasm node --test dashboard.mjs
// Screenshots of each page go to ./artifacts/ (CI keeps that folder).

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const URL_ = env('CLOUDAI_URL');
const ADMIN = env('CLOUDAI_ADMIN_TOKEN');
const USER = env('CLOUDAI_USER_TOKEN');
const IMAGE = env('CLOUDAI_TEST_IMAGE');
const POLICY_WASM = env('CLOUDAI_POLICY_WASM');
const ARTIFACTS = new URL('./artifacts/', import.meta.url).pathname;
mkdirSync(ARTIFACTS, { recursive: true });

let browser;
let page;

before(async () => {
  browser = await chromium.launch({
    executablePath: env('CLOUDAI_CHROMIUM', '/usr/bin/chromium'),
    // Root in a container has no user namespaces for the sandbox.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on('pageerror', (error) => console.error('page error:', error));
  // Refused calls (401, 403) are part of the test; other errors in the page are worth seeing.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) console.error('console:', m.text());
  });
});

after(async () => {
  await browser?.close();
});

const shot = (name) => page.screenshot({ path: `${ARTIFACTS}${name}.png`, fullPage: true });

async function api(method, path, body, token = ADMIN) {
  const response = await fetch(`${URL_}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function login(token) {
  await page.goto(`${URL_}/ui`);
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
}

/** Records in the page every state the task page shows, polled every 20 ms. */
async function recordStates() {
  await page.evaluate(() => {
    window.__states = [];
    clearInterval(window.__stateTimer);
    window.__stateTimer = setInterval(() => {
      const s = document.querySelector('[data-testid=task-status] [data-status]')?.dataset.status;
      if (s && window.__states.at(-1) !== s) window.__states.push(s);
    }, 20);
  });
}

const states = () => page.evaluate(() => window.__states);
const statusIs = (s, timeout = 60000) =>
  page.waitForSelector(`[data-testid=task-status] [data-status=${s}]`, { timeout });

test('a wrong token is refused on the login screen', async () => {
  await login('cai_u_not_a_token');
  await page.waitForSelector('#login-error:not([hidden])');
  assert.match(await page.textContent('#login-error'), /unauthorized/);
});

test('a user token sees no admin pages', async () => {
  await login(USER);
  await page.waitForSelector('[data-testid=overview]');
  assert.equal(await page.isVisible('nav a[data-page=workers]'), false);
  assert.equal(await page.isVisible('nav a[data-page=policies]'), false);
  assert.equal(await page.isVisible('nav a[data-page=tasks]'), true);
  await page.click('#logout');
  await page.waitForSelector('#login');
});

test('an admin logs in; the overview and the live stream come up', async () => {
  await login(ADMIN);
  await page.waitForSelector('[data-testid=tasks-by-state]');
  await page.waitForSelector('[data-testid=live-status][data-state=live]', { timeout: 15000 });
  assert.equal(await page.isVisible('nav a[data-page=workers]'), true);
  // Set once: still here at the end means the page was never reloaded.
  await page.evaluate(() => { window.__noReload = 'still the same page'; });
  await shot('overview');
});

test('the submit form shows the API\'s validation message beside the form', async () => {
  await page.click('nav a[data-page=submit]');
  await page.fill('#f-docker_image', IMAGE);
  await page.fill('#f-req_cpu', '-1');
  await page.click('#submit-form button[type=submit]');
  await page.waitForSelector('[data-testid=submit-error]:not([hidden])');
  assert.match(await page.textContent('[data-testid=submit-error]'), /req_cpu must be at least 1\/1024.*validation_failed/);
  assert.equal(await page.getAttribute('#f-req_cpu', 'aria-invalid'), 'true');
  await shot('submit-invalid');
});

let firstTask;

test('a task submitted from the form goes queued -> running -> completed live, and its logs show', async () => {
  await page.fill('#f-req_cpu', '0.5');
  await page.fill('#f-req_memory', '0.25');
  await page.fill('#f-command', 'sh -c "echo hello-from-the-dashboard; sleep 2; echo bye"');
  await page.click('#submit-form button[type=submit]');
  await page.waitForURL(/#\/tasks\/task-/);
  await page.waitForSelector('[data-testid=task-status] [data-status]');
  await recordStates();
  firstTask = await page.getAttribute('[data-testid=task-detail]', 'data-task-id');
  await statusIs('completed');
  const seen = await states();
  assert.ok(seen.includes('running'), `the page never showed running: ${seen}`);
  assert.ok(seen.indexOf('running') < seen.indexOf('completed'), `${seen}`);
  assert.ok(['pending', 'queued', 'running'].includes(seen[0]), `${seen}`);
  await page.waitForSelector('[data-testid=logs]:has-text("hello-from-the-dashboard")');
  await page.waitForSelector('[data-testid=log-state]:has-text("ended: completed")');
  assert.match(await page.textContent('[data-testid=logs]'), /bye/);
  await page.waitForSelector('[data-testid=assignments] td.mono');
  await shot('task-completed');
});

test('a long task is cancelled from its page', async () => {
  await page.click('nav a[data-page=submit]');
  await page.fill('#f-docker_image', IMAGE);
  await page.fill('#f-req_cpu', '0.5');
  await page.fill('#f-req_memory', '0.25');
  await page.fill('#f-command', 'sh -c "echo started; sleep 300"');
  await page.click('#submit-form button[type=submit]');
  await page.waitForURL(/#\/tasks\/task-/);
  await statusIs('running');
  await page.waitForSelector('[data-testid=logs]:has-text("started")');
  await page.click('#cancel');
  await statusIs('cancelled', 30000);
  await shot('task-cancelled');
});

test('the tasks list filters by state, and a task submitted elsewhere appears live', async () => {
  await page.click('nav a[data-page=tasks]');
  await page.waitForSelector(`tr[data-task-id="${firstTask}"]`);
  await page.selectOption('#filter-status', 'completed');
  await page.click('#task-filters button[type=submit]');
  await page.waitForURL(/status=completed/);
  // The page is rebuilt for the new hash and lists again: wait for that listing (the old
  // page's rows may still be on screen right after the URL changes).
  await page.waitForFunction((id) => {
    const rows = document.querySelectorAll('[data-testid=task-rows] tr');
    return rows.length === 1 && rows[0].dataset.taskId === id;
  }, firstTask, { timeout: 10000 });
  await page.selectOption('#filter-status', '');
  await page.click('#task-filters button[type=submit]');
  await page.waitForURL(/#\/tasks$/);
  await page.waitForSelector(`tr[data-task-id="${firstTask}"]`);
  // 0.1 GB is stored as 102 MiB (0.099609375 GB): the API keeps that, the page reads 0.1.
  const { status, body } = await api('POST', '/v1/tasks', { docker_image: IMAGE, command: 'true', req_cpu: 0.5, req_memory: 0.1 }, USER);
  assert.equal(status, 201, JSON.stringify(body));
  assert.equal(body.req_memory, 0.099609375, JSON.stringify(body));
  await page.waitForSelector(`tr[data-task-id="${body.task_id}"]`, { timeout: 5000 });
  assert.equal(await page.textContent(`tr[data-task-id="${body.task_id}"] [data-testid=req-memory]`), '0.1');
  await page.waitForSelector(`tr[data-task-id="${body.task_id}"] [data-status=completed]`, { timeout: 30000 });
  await shot('tasks');
});

test('the tasks of an array are one row in the list, which opens the array', async () => {
  await page.click('nav a[data-page=tasks]');
  await page.waitForSelector('[data-testid=task-rows] tr');
  const { status, body } = await api('POST', '/v1/arrays', { count: 3, task: { docker_image: IMAGE, command: 'true', req_cpu: 0.25, req_memory: 0.25 } }, USER);
  assert.equal(status, 201, JSON.stringify(body));
  const group = `tr.array-group[data-array-id="${body.array_id}"]`;
  await page.waitForSelector(group, { timeout: 10000 });
  assert.match(await page.textContent(group), /3 tasks of this array here/);
  await page.click(`${group} a`);
  await page.waitForURL(new RegExp(`array=${body.array_id}`));
  await page.waitForFunction((id) => {
    const rows = [...document.querySelectorAll('[data-testid=task-rows] tr[data-task-id]')];
    return rows.length === 3 && rows.every((r) => r.dataset.taskId.startsWith(id.replace('array-', 'task-')));
  }, body.array_id, { timeout: 10000 });
  assert.match(await page.textContent('[data-testid=array-states]'), /3 tasks: /);
  await shot('array');
  // A task after the array shows what it waits for, linked.
  const after = await api('POST', '/v1/tasks', { docker_image: IMAGE, command: 'true', req_cpu: 0.25, req_memory: 0.25, after: [{ array_id: body.array_id, condition: 'finished' }] }, USER);
  assert.ok([201, 202].includes(after.status), JSON.stringify(after.body));
  await page.goto(`${URL_}/ui#/tasks/${after.body.task_id}`);
  await page.waitForSelector(`[data-testid=task-after] a[href="#/tasks?array=${body.array_id}"]`);
  assert.match(await page.textContent('[data-testid=task-after]'), /\(finished\)/);
});

test('a worker is drained and undrained from the workers page', async () => {
  await page.click('nav a[data-page=workers]');
  const row = page.locator('.wrow').first();
  await row.waitFor();
  const id = await row.getAttribute('data-worker-id');
  await row.locator('button:has-text("Drain")').click();
  await page.waitForSelector(`.wrow[data-worker-id="${id}"] .badge.draining`);
  const { body } = await api('GET', `/v1/workers/${id}`);
  assert.equal(body.draining, true);
  await shot('workers-drained');
  await page.locator(`.wrow[data-worker-id="${id}"] button:has-text("Undrain")`).click();
  await page.waitForSelector(`.wrow[data-worker-id="${id}"] .badge.up`);
  assert.equal((await api('GET', `/v1/workers/${id}`)).body.draining, false);
});

test('a policy is uploaded, dry-run and activated, and the overview shows it', async () => {
  await page.click('nav a[data-page=policies]');
  await page.waitForSelector('[data-testid=active-placement]');
  await page.setInputFiles('#policy-file', POLICY_WASM);
  await page.fill('#policy-name', 'first-fit');
  await page.fill('#policy-version', '1.0.0');
  await page.click('#policy-upload button[type=submit]');
  await page.waitForSelector('[data-testid=upload-progress]:has-text("Stored first-fit@1.0.0")', { timeout: 60000 });
  const version = page.locator('[data-policy=first-fit] tr[data-version="1.0.0"]');
  await version.waitFor();
  await version.locator('button:has-text("Dry run")').click();
  await page.waitForSelector('[data-testid=dry-run] h2:has-text("first-fit@1.0.0 beside")');
  await version.locator('button:has-text("Activate")').click();
  await page.waitForSelector('[data-testid=active-placement]:has-text("first-fit@1.0.0")');
  await version.locator('.badge.active').waitFor();
  await shot('policies');
  await page.click('nav a[data-page=overview]');
  await page.waitForSelector('[data-testid=placement-policy]:has-text("first-fit@1.0.0")');
  await shot('overview-after');
});

test('the page was never reloaded, and a refused token returns to the login screen', async () => {
  assert.equal(await page.evaluate(() => window.__noReload), 'still the same page');
  await page.click('nav a[data-page=tasks]');
  await page.waitForSelector('[data-testid=task-rows] tr');
  await page.evaluate(() => sessionStorage.setItem('cloudai.token', 'cai_u_revoked'));
  await page.click('#task-filters button:has-text("Refresh")');
  await page.waitForSelector('#login-error:has-text("refused the token")');
  await shot('login-after-401');
});
