// Quota, a CloudAI admission policy (world `admission` of wit/policy.wit): per-user caps on
// tasks and on what a user's running tasks reserve, the same semantics as policies/quota.
//
// Configuration (JSON, every key optional, `{}` caps nothing):
//   {"default": {"max_running_tasks": 10, "max_queued_and_running_tasks": 50,
//                "max_cpu": 32, "max_memory": 128, "max_storage": 1000, "max_gpu": 2,
//                "max_priority": 10},
//    "users": {"alice": {"max_gpu": 4}, "ci-bot": {"max_cpu": null}}}
// `default` applies to every user; an entry of `users` overrides it key by key (`null` lifts
// that cap). Unknown keys, negative or non-numeric values and fractional counts are refused;
// `max_priority` (the highest task priority the user may submit) is any 32-bit whole number.
//
// A task is rejected when its request alone exceeds a resource cap, a task cap is 0 or its
// priority exceeds `max_priority`;
// deferred when it fits the caps but not on top of the user's current usage; accepted
// otherwise.

import { RESOURCES, describeShort } from './common.js';

const COUNT_KEYS = ['max_running_tasks', 'max_queued_and_running_tasks'];
const AMOUNT_KEYS = RESOURCES.map((r) => `max_${r}`);
const PRIORITY_KEY = 'max_priority';
const CAP_KEYS = [...COUNT_KEYS, ...AMOUNT_KEYS, PRIORITY_KEY];

// The parsed configuration, kept by `configure` for the calls on this instance.
let quota = { default: {}, users: new Map() };

function error(message) {
  return `quota configuration: ${message}`;
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

// The caps written at `path` over `base`: a key written replaces the base's (null: uncapped),
// a key left out keeps it.
function capsOver(written, base, path) {
  if (!isObject(written)) throw error(`${path} must be an object of caps`);
  const caps = { ...base };
  for (const [key, v] of Object.entries(written)) {
    if (!CAP_KEYS.includes(key)) {
      throw error(`unknown key \`${key}\` in ${path} (expected one of ${CAP_KEYS.join(', ')})`);
    }
    if (v === null) {
      delete caps[key];
    } else if (COUNT_KEYS.includes(key)) {
      if (!Number.isInteger(v) || v < 0 || v > 1e9) {
        throw error(`${path}.${key} must be a whole number >= 0`);
      }
      caps[key] = v;
    } else if (key === PRIORITY_KEY) {
      if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647) {
        throw error(`${path}.${key} must be a whole number from -2147483648 to 2147483647`);
      }
      caps[key] = v;
    } else {
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
        throw error(`${path}.${key} must be a number >= 0`);
      }
      caps[key] = v;
    }
  }
  return caps;
}

export const config = {
  configure(text) {
    let c;
    try {
      c = JSON.parse(text);
    } catch (e) {
      throw error(`not JSON: ${e.message}`);
    }
    if (!isObject(c)) throw error('expected a JSON object');
    for (const key of Object.keys(c)) {
      if (key !== 'default' && key !== 'users') {
        throw error(`unknown key \`${key}\` (expected \`default\` or \`users\`)`);
      }
    }
    const defaults = capsOver(c.default ?? {}, {}, 'default');
    const users = new Map();
    const written = c.users ?? {};
    if (!isObject(written)) throw error('users must be an object of user id to caps');
    for (const [user, caps] of Object.entries(written)) {
      if (user === '') throw error('users: a user id must not be empty');
      users.set(user, capsOver(caps, defaults, `users.${user}`));
    }
    quota = { default: defaults, users };
  },
};

export function admit(task, usage) {
  const user = task.user;
  const caps = quota.users.get(user) ?? quota.default;
  const req = [task.request.cpu, task.request.memory, task.request.storage, task.request.gpu];
  const reserved = [usage.reserved.cpu, usage.reserved.memory, usage.reserved.storage, usage.reserved.gpu];

  // What no drop in usage can cure.
  const never = [];
  for (const key of COUNT_KEYS) {
    if (caps[key] === 0) never.push(`quota ${key} for user ${user} is 0`);
  }
  for (let r = 0; r < 4; r++) {
    const max = caps[AMOUNT_KEYS[r]];
    if (max !== undefined && req[r] > max) {
      never.push(
        `${RESOURCES[r]} request of ${describeShort(r, req[r])} exceeds the quota ` +
          `${AMOUNT_KEYS[r]} of ${describeShort(r, max)} for user ${user}`,
      );
    }
  }
  const maxPriority = caps[PRIORITY_KEY];
  if (maxPriority !== undefined && task.priority > maxPriority) {
    never.push(`priority ${task.priority} exceeds the quota max_priority of ${maxPriority} for user ${user}`);
  }
  if (never.length > 0) return { tag: 'reject', val: never.join('; ') };

  // What the user's current usage leaves no room for.
  const later = [];
  const maxRunning = caps.max_running_tasks;
  if (maxRunning !== undefined && usage.runningTasks >= maxRunning) {
    later.push(`quota max_running_tasks = ${maxRunning} for user ${user}: ${usage.runningTasks} running`);
  }
  const maxAdmitted = caps.max_queued_and_running_tasks;
  if (maxAdmitted !== undefined && usage.queuedTasks + usage.runningTasks >= maxAdmitted) {
    later.push(
      `quota max_queued_and_running_tasks = ${maxAdmitted} for user ${user}: ` +
        `${usage.queuedTasks} queued + ${usage.runningTasks} running`,
    );
  }
  for (let r = 0; r < 4; r++) {
    const max = caps[AMOUNT_KEYS[r]];
    // A task that requests none of a resource adds nothing to it, even when the user is above
    // that cap (lowered since): only what the task asks for is checked.
    if (max !== undefined && req[r] > 0 && reserved[r] + req[r] > max) {
      later.push(
        `quota ${AMOUNT_KEYS[r]} = ${describeShort(r, max)} for user ${user}: ` +
          `${describeShort(r, reserved[r])} reserved by running tasks + ${describeShort(r, req[r])} requested`,
      );
    }
  }
  if (later.length > 0) return { tag: 'defer', val: `${later.join('; ')}; admitted once usage drops` };
  return { tag: 'accept' };
}
