// Unit tests of the policies' logic under Node (`node --test`): the same modules the
// components embed, called with inputs shaped as the component bindings pass them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { place, config as spreadConfig } from './spread.js';
import { admit, config as quotaConfig } from './quota.js';

// Rows [cpu, memory, storage, gpu] into the WIT columns; labels as {key: value} per entity.
function input(workers, tasks) {
  const strings = [];
  const intern = (s) => {
    let i = strings.indexOf(s);
    if (i < 0) i = strings.push(s) - 1;
    return i;
  };
  const labels = (rows) => {
    const offsets = [0];
    const pairs = [];
    for (const row of rows) {
      for (const [k, v] of Object.entries(row.labels ?? {})) pairs.push([intern(k), intern(v)]);
      offsets.push(pairs.length);
    }
    return { offsets, pairs };
  };
  const col = (rows, field, r) => rows.map((row) => row[field][r]);
  return {
    strings,
    workers: {
      totalCpu: col(workers, 'total', 0), totalMemory: col(workers, 'total', 1),
      totalStorage: col(workers, 'total', 2), totalGpu: col(workers, 'total', 3),
      availableCpu: col(workers, 'free', 0), availableMemory: col(workers, 'free', 1),
      availableStorage: col(workers, 'free', 2), availableGpu: col(workers, 'free', 3),
      labels: labels(workers),
    },
    tasks: {
      reqCpu: col(tasks, 'req', 0), reqMemory: col(tasks, 'req', 1),
      reqStorage: col(tasks, 'req', 2), reqGpu: col(tasks, 'req', 3),
      labels: labels(tasks),
    },
  };
}

const idle = (total, labels) => ({ total, free: total, labels });

test('a batch is spread in turn over equal workers', () => {
  const workers = [idle([4, 8, 0, 0]), idle([4, 8, 0, 0]), idle([4, 8, 0, 0])];
  const tasks = Array(4).fill({ req: [1, 1, 0, 0] });
  assert.deepEqual(place(input(workers, tasks)).map((d) => d.val), [0, 1, 2, 0]);
});

test('the least loaded worker wins', () => {
  const workers = [
    { total: [8, 16, 0, 0], free: [4, 16, 0, 0] },
    { total: [8, 16, 0, 0], free: [6, 12, 0, 0] },
  ];
  assert.deepEqual(place(input(workers, [{ req: [1, 1, 0, 0] }])), [{ tag: 'assign', val: 1 }]);
});

test('workers with the task labels come first, even when more loaded', () => {
  const workers = [idle([8, 16, 0, 0], { zone: 'a' }), { total: [8, 16, 0, 0], free: [1, 2, 0, 0], labels: { zone: 'b' } }];
  const tasks = [{ req: [1, 1, 0, 0], labels: { zone: 'b' } }, { req: [1, 1, 0, 0], labels: { zone: 'b' } }];
  // The second no longer fits on the zone-b worker: it goes elsewhere rather than wait.
  assert.deepEqual(place(input(workers, tasks)).map((d) => d.val), [1, 0]);
});

test('never more than available, counting the batch', () => {
  const workers = [{ total: [4, 8, 0, 0], free: [1.5, 8, 0, 0] }, { total: [4, 8, 0, 0], free: [1.5, 8, 0, 0] }];
  const d = place(input(workers, Array(10).fill({ req: [1, 1, 0, 0] })));
  assert.equal(d.filter((x) => x.tag === 'assign').length, 2);
  assert.deepEqual(d[2], { tag: 'wait', val: 'no worker has 1 CPU free (largest free: 0.5 CPU)' });
});

test('a request no worker could ever hold is unschedulable', () => {
  const d = place(input([idle([4, 8, 0, 1])], [{ req: [1, 1, 0, 2] }]));
  assert.deepEqual(d, [{ tag: 'unschedulable', val: 'no worker has 2 GPU in total (largest: 1 GPU)' }]);
  assert.deepEqual(place(input([], [{ req: [1, 0, 0, 0] }])), [{ tag: 'wait', val: 'no active worker' }]);
});

test('spread takes no settings', () => {
  spreadConfig.configure('{}');
  assert.throws(() => spreadConfig.configure('{"x": 1}'), /unknown key `x`/);
});

const usage = (running, queued, reserved) => ({
  runningTasks: running, queuedTasks: queued, pendingTasks: 0,
  reserved: { cpu: reserved[0], memory: reserved[1], storage: reserved[2], gpu: reserved[3] },
});
const task = (user, req, priority = 0) => ({
  user, priority, request: { cpu: req[0], memory: req[1], storage: req[2], gpu: req[3] },
});

test('quota rejects, defers and accepts as the Rust quota does', () => {
  quotaConfig.configure(JSON.stringify({
    default: { max_running_tasks: 3, max_queued_and_running_tasks: 5, max_cpu: 8, max_memory: 32, max_gpu: 0 },
    users: { alice: { max_gpu: 2, max_cpu: null }, bob: { max_running_tasks: 1 } },
  }));
  assert.deepEqual(admit(task('carol', [16, 1, 0, 0]), usage(0, 0, [0, 0, 0, 0])), {
    tag: 'reject', val: 'cpu request of 16 CPU exceeds the quota max_cpu of 8 CPU for user carol',
  });
  assert.deepEqual(admit(task('bob', [1, 1, 0, 0]), usage(1, 0, [1, 1, 0, 0])), {
    tag: 'defer', val: 'quota max_running_tasks = 1 for user bob: 1 running; admitted once usage drops',
  });
  assert.deepEqual(admit(task('alice', [64, 1, 0, 2]), usage(0, 0, [0, 0, 0, 0])), { tag: 'accept' });
  assert.deepEqual(admit(task('dave', [2, 1, 0, 0]), usage(1, 0, [7.5, 1, 0, 0])).tag, 'defer');
});

test('quota rejects a priority above max_priority; a user entry overrides or lifts it', () => {
  quotaConfig.configure(JSON.stringify({
    default: { max_priority: 10 },
    users: { bob: { max_priority: -5 }, 'ci-bot': { max_priority: null } },
  }));
  assert.deepEqual(admit(task('carol', [1, 1, 0, 0], 10), usage(0, 0, [0, 0, 0, 0])), { tag: 'accept' });
  assert.deepEqual(admit(task('carol', [1, 1, 0, 0], 50), usage(0, 0, [0, 0, 0, 0])), {
    tag: 'reject', val: 'priority 50 exceeds the quota max_priority of 10 for user carol',
  });
  assert.deepEqual(admit(task('bob', [1, 1, 0, 0], 0), usage(0, 0, [0, 0, 0, 0])), {
    tag: 'reject', val: 'priority 0 exceeds the quota max_priority of -5 for user bob',
  });
  assert.deepEqual(admit(task('ci-bot', [1, 1, 0, 0], 2147483647), usage(0, 0, [0, 0, 0, 0])), { tag: 'accept' });
  assert.throws(() => quotaConfig.configure('{"default": {"max_priority": 2.5}}'), /default.max_priority must be a whole number/);
  assert.throws(() => quotaConfig.configure('{"default": {"max_priority": 3e9}}'), /whole number/);
});

test('quota refuses bad configuration with the key at fault', () => {
  assert.throws(() => quotaConfig.configure('{"default": {"max_cpu": -1}}'), /default.max_cpu must be a number >= 0/);
  assert.throws(() => quotaConfig.configure('{"default": {"max_running_tasks": 1.5}}'), /whole number/);
  assert.throws(() => quotaConfig.configure('{"users": {"bob": {"max_cpus": 1}}}'), /unknown key `max_cpus` in users.bob/);
  assert.throws(() => quotaConfig.configure('{"defaults": {}}'), /unknown key `defaults`/);
  assert.throws(() => quotaConfig.configure('[1]'), /expected a JSON object/);
  assert.throws(() => quotaConfig.configure('{'), /not JSON/);
});
