// Dashboard responsiveness at scale (BENCHMARKS.md): fills a running host through its API with
// simulated workers and tasks, then times in headless Chromium the first render of each page
// and the time from an API action to the change on screen.
//
//   cloudai serve --data-dir D --no-local-worker --heartbeat-staleness-s 3600 &
//   CLOUDAI_URL=http://127.0.0.1:8080 CLOUDAI_ADMIN_TOKEN=$(cat D/admin.token) \
//   CLOUDAI_JOIN_TOKEN=$(cat D/join.token) BENCH_WORKERS=1000 BENCH_TASKS=100000 node bench.mjs
//
// The workers never heartbeat (hence the longest staleness the host takes, an hour) and never
// run anything: the tasks stay queued or placed, which is what the pages have to show.

import { chromium } from 'playwright-core';

const URL_ = process.env.CLOUDAI_URL;
const ADMIN = process.env.CLOUDAI_ADMIN_TOKEN;
const JOIN = process.env.CLOUDAI_JOIN_TOKEN;
const WORKERS = Number(process.env.BENCH_WORKERS ?? 1000);
const TASKS = Number(process.env.BENCH_TASKS ?? 100000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 10);
const PAGES = (process.env.BENCH_PAGES ?? 'overview,tasks,workers,policies').split(',');

async function call(method, path, body, token = ADMIN) {
  const response = await fetch(`${URL_}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  if (!response.ok && response.status !== 409) throw new Error(`${method} ${path}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Runs `count` calls of `one(i)`, `width` at a time. */
async function pool(count, width, one) {
  let next = 0;
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < count) await one(next++);
  }));
}

async function fill() {
  const have = (await call('GET', '/v1/workers')).workers.length;
  let started = performance.now();
  await pool(Math.max(0, WORKERS - have), 16, (i) => call('POST', '/v1/workers', {
    worker_id: `sim-${String(have + i).padStart(4, '0')}`, worker_ip: '127.0.0.1:9',
    total_cpu: 64, total_memory: 256, total_storage: 1000, total_gpu: (have + i) % 4 === 0 ? 4 : 0,
    labels: { zone: `z${(have + i) % 3}`, rack: `r${(have + i) % 20}` },
  }, JOIN));
  console.log(`workers: ${WORKERS} (${Math.round(performance.now() - started)} ms to add ${Math.max(0, WORKERS - have)})`);
  const overview = await call('GET', '/v1/overview').catch(() => null);
  const stored = overview ? Object.values(overview.tasks_by_state).reduce((a, b) => a + b, 0) : 0;
  started = performance.now();
  await pool(Math.max(0, TASKS - stored), 32, (i) => call('POST', '/v1/tasks', {
    docker_image: 'busybox:1.36', command: `echo ${i}`, req_cpu: 2, req_memory: 1, priority: i % 7,
    labels: { 'task-type': `t${i % 10}` },
  }));
  console.log(`tasks: ${TASKS} (${Math.round(performance.now() - started)} ms to add ${Math.max(0, TASKS - stored)})`);
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const max = (xs) => Math.max(...xs);
const ms = (x) => `${Math.round(x)} ms`;

async function measure() {
  const browser = await chromium.launch({
    executablePath: process.env.CLOUDAI_CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.addInitScript((token) => sessionStorage.setItem('cloudai.token', token), ADMIN);
  const results = [];
  const note = (what, values) => {
    results.push([what, values]);
    console.log(`${what}: median ${ms(median(values))}, max ${ms(max(values))} (${values.length} runs)`);
  };

  // First render: from the navigation to the page's data on screen.
  const pages = [
    ['overview', '#/overview', '[data-testid=tasks-by-state] .tile'],
    ['tasks', '#/tasks', '[data-testid=task-rows] tr[data-task-id]'],
    ['workers', '#/workers', '.wrow[data-worker-id]'],
    ['policies', '#/policies', '[data-testid=active-placement]'],
  ];
  for (const [name, hash, selector] of pages.filter(([name]) => PAGES.includes(name))) {
    const times = [];
    for (let i = 0; i < ROUNDS; i++) {
      await page.goto('about:blank');
      const t0 = performance.now();
      await page.goto(`${URL_}/ui${hash}`);
      await page.waitForSelector(selector, { timeout: 30000 });
      times.push(performance.now() - t0);
    }
    note(`first render (full load) ${name}`, times);
  }
  // The same, moving between pages inside the app (no page load).
  for (const [name, , selector] of pages.filter(([name]) => PAGES.includes(name))) {
    const times = [];
    for (let i = 0; i < ROUNDS; i++) {
      await page.click('nav a[data-page=submit]');
      await page.waitForSelector('#submit-form');
      const t0 = performance.now();
      await page.click(`nav a[data-page=${name}]`);
      await page.waitForSelector(selector, { timeout: 30000 });
      times.push(performance.now() - t0);
    }
    note(`first render (in-app navigation) ${name}`, times);
  }
  const firstTask = await page.goto(`${URL_}/ui#/tasks`).then(() => page.getAttribute('[data-testid=task-rows] tr[data-task-id]', 'data-task-id'));
  await page.goto(`${URL_}/ui#/tasks/${firstTask}`);
  await page.waitForSelector('[data-testid=task-status] [data-status]');

  await page.waitForSelector('[data-testid=live-status][data-state=live]', { timeout: 15000 });
  // Live: an API call from outside the page, until the page shows its effect.
  const submitted = [];
  await page.click('nav a[data-page=tasks]');
  await page.waitForSelector('[data-testid=task-rows] tr[data-task-id]');
  const answered = [];
  for (let i = 0; i < ROUNDS; i++) {
    const t0 = performance.now();
    const task = await call('POST', '/v1/tasks', { docker_image: 'busybox:1.36', req_cpu: 2, req_memory: 1 });
    answered.push(performance.now() - t0);
    await page.waitForSelector(`tr[data-task-id="${task.task_id}"]`, { timeout: 10000 });
    submitted.push(performance.now() - t0);
  }
  note('(the submission\'s own answer)', answered);
  note('live: submit via API -> row on the tasks page', submitted);

  const drained = [];
  await page.click('nav a[data-page=workers]');
  await page.waitForSelector('.wrow[data-worker-id]');
  const id = await page.getAttribute('.wrow[data-worker-id]', 'data-worker-id');
  for (let i = 0; i < ROUNDS; i++) {
    for (const [what, badge] of [['drain', 'draining'], ['undrain', 'up']]) {
      const t0 = performance.now();
      await call('POST', `/v1/workers/${id}/${what}`);
      await page.waitForSelector(`.wrow[data-worker-id="${id}"] .badge.${badge}`, { timeout: 10000 });
      drained.push(performance.now() - t0);
    }
  }
  note('live: drain/undrain via API -> badge on the workers page', drained);

  if (!PAGES.includes('overview')) return browser.close();
  const depth = [];
  await page.click('nav a[data-page=overview]');
  await page.waitForSelector('[data-testid=queue-depth] .n');
  for (let i = 0; i < ROUNDS; i++) {
    const before = await page.textContent('[data-testid=queue-depth] .n');
    const t0 = performance.now();
    await call('POST', '/v1/tasks', { docker_image: 'busybox:1.36', req_cpu: 2, req_memory: 1 });
    await page.waitForFunction((b) => document.querySelector('[data-testid=queue-depth] .n')?.textContent !== b, before, { timeout: 10000 });
    depth.push(performance.now() - t0);
  }
  note('live: submit via API -> queue depth on the overview', depth);
  await browser.close();
  return results;
}

if (process.env.BENCH_SKIP_FILL !== '1') await fill();
await measure();
