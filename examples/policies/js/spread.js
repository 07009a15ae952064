// Spread with label affinity, a CloudAI placement policy (world `placement` of
// wit/policy.wit). Each task, in queue order, goes to the first worker in this order whose
// free capacity holds the whole request:
//   1. the workers that carry the most of the task's labels (same key and value) first;
//   2. then the least loaded first: load = the worker's most loaded resource,
//      max over the resources it has of (total - free) / total, counting the batch's own
//      earlier assignments (so equal workers take a batch in turn);
//   3. then the lowest index, so that the same round is always decided the same way.
// A task no worker takes now waits, unless no worker's total could ever hold it: then it is
// unschedulable. Both reasons name the short resource, as the Rust kit does.
//
// Why "first in an order" rather than scoring every worker for every task: an interpreter
// pays about a microsecond per worker visited, so 100 tasks x 10,000 workers scored one by
// one take a second. The order is built once per round (a native sort of one number per
// worker: affinity level, load rounded to 2^-32 and index packed into one float) and an
// assignment moves one worker in it, so a task visits only the workers ahead of the first
// one that fits.

import { describe, describeShort, describeRequest } from './common.js';

export const config = {
  configure(text) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw `spread configuration: not JSON: ${e.message}`;
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw 'spread configuration: expected a JSON object';
    }
    const keys = Object.keys(value);
    if (keys.length > 0) {
      throw `spread configuration: unknown key \`${keys[0]}\` (the policy takes no settings)`;
    }
  },
};

export function place(input) {
  const w = input.workers;
  const t = input.tasks;
  const total = [w.totalCpu, w.totalMemory, w.totalStorage, w.totalGpu];
  const reqCols = [t.reqCpu, t.reqMemory, t.reqStorage, t.reqGpu];
  // The shortest column: a malformed input cannot make us read past the end of one.
  const nw = Math.min(...total.map((c) => c.length), w.availableCpu.length,
    w.availableMemory.length, w.availableStorage.length, w.availableGpu.length);
  const nt = Math.min(...reqCols.map((c) => c.length));
  // Our own copy of the free capacity: the batch's assignments come out of it.
  const free = [w.availableCpu.slice(), w.availableMemory.slice(), w.availableStorage.slice(),
    w.availableGpu.slice()];
  const [t0, t1, t2, t3] = total;
  const [f0, f1, f2, f3] = free;
  // loadOf, inlined: this loop and the order's keys are most of the round's own time.
  const load = new Float64Array(nw);
  for (let i = 0; i < nw; i++) {
    let l = 0;
    let x;
    if (t0[i] > 0 && (x = (t0[i] - f0[i]) / t0[i]) > l) l = x;
    if (t1[i] > 0 && (x = (t1[i] - f1[i]) / t1[i]) > l) l = x;
    if (t2[i] > 0 && (x = (t2[i] - f2[i]) / t2[i]) > l) l = x;
    if (t3[i] > 0 && (x = (t3[i] - f3[i]) / t3[i]) > l) l = x;
    load[i] = l < 1 ? l : 1;
  }

  const orders = new Orders(input, nw, load);
  const decisions = new Array(nt);
  const req = [0, 0, 0, 0];
  for (let task = 0; task < nt; task++) {
    for (let r = 0; r < 4; r++) req[r] = reqCols[r][task];
    const [r0, r1, r2, r3] = req;
    const order = orders.forTask(task);
    let best = -1;
    for (let p = 0; p < nw; p++) {
      const i = order.keys[p] % order.idx;
      if (r0 <= f0[i] && r1 <= f1[i] && r2 <= f2[i] && r3 <= f3[i]) {
        best = i;
        break;
      }
    }
    if (best >= 0) {
      for (let r = 0; r < 4; r++) free[r][best] -= req[r];
      const before = load[best];
      load[best] = loadOf(total, free, best);
      orders.moved(best, before);
      decisions[task] = { tag: 'assign', val: best };
    } else {
      decisions[task] = noFit(req, total, free, nw);
    }
  }
  return decisions;
}

// max over the resources worker `i` has of (total - free) / total, within [0, 1].
function loadOf(total, free, i) {
  let load = 0;
  for (let r = 0; r < 4; r++) {
    const tot = total[r][i];
    if (tot > 0) load = Math.max(load, (tot - free[r][i]) / tot);
  }
  return Math.min(load, 1);
}

// The workers in preference order, one order per distinct label set among the round's tasks
// (most rounds have one or two). An order is a sorted Float64Array of keys
// `level * span + round(load * q) * idx + worker`, level = labels of the set the worker lacks.
class Orders {
  constructor(input, nw, load) {
    this.input = input;
    this.nw = nw;
    this.load = load;
    this.idx = 1;
    while (this.idx <= nw) this.idx *= 2;
    this.bySet = new Map();
    this.byPair = null;
  }

  forTask(task) {
    const tl = this.input.tasks.labels;
    const pairs = [];
    for (let p = tl.offsets[task]; p < tl.offsets[task + 1]; p++) pairs.push(this.pairId(tl.pairs[p]));
    pairs.sort((a, b) => a - b);
    const id = pairs.join(',');
    let order = this.bySet.get(id);
    if (order === undefined) {
      order = this.build(pairs);
      this.bySet.set(id, order);
    }
    return order;
  }

  pairId([k, v]) {
    return k * (this.input.strings.length + 1) + v;
  }

  build(pairs) {
    const { nw, idx, load } = this;
    // Matches per worker: the labels of the set it carries.
    const matches = new Int32Array(nw);
    if (pairs.length > 0) {
      const wanted = new Set(pairs);
      const wl = this.input.workers.labels;
      for (let i = 0; i < nw; i++) {
        for (let p = wl.offsets[i]; p < wl.offsets[i + 1]; p++) {
          if (wanted.has(this.pairId(wl.pairs[p]))) matches[i]++;
        }
      }
    }
    let levels = 1;
    while (levels <= pairs.length) levels *= 2;
    // Keys below 2^53 stay exact integers in a float.
    let q = 2 ** 32;
    while (levels * 2 * q * idx > 2 ** 53) q /= 2;
    const span = 2 * q * idx;
    const lacking = new Int32Array(nw);
    const keys = new Float64Array(nw);
    const n = pairs.length;
    for (let i = 0; i < nw; i++) {
      lacking[i] = n - matches[i];
      keys[i] = lacking[i] * span + Math.floor(load[i] * q) * idx + i; // keyOf, inlined
    }
    keys.sort();
    const order = { idx, q, span, lacking, keys };
    return order;
  }

  // Worker `i`'s load went up from `before`: move it back into place in every order.
  moved(i, before) {
    const after = this.load[i];
    for (const order of this.bySet.values()) {
      const keys = order.keys;
      const n = keys.length;
      const pos = lowerBound(keys, 0, n, keyOf(order, i, before));
      keys.copyWithin(pos, pos + 1, n);
      const key = keyOf(order, i, after);
      const at = lowerBound(keys, 0, n - 1, key);
      keys.copyWithin(at + 1, at, n - 1);
      keys[at] = key;
    }
  }
}

function keyOf(order, i, load) {
  return order.lacking[i] * order.span + Math.floor(load * order.q) * order.idx + i;
}

function lowerBound(keys, lo, hi, key) {
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function fits(req, cols, i) {
  return req[0] <= cols[0][i] && req[1] <= cols[1][i] && req[2] <= cols[2][i] && req[3] <= cols[3][i];
}

// The decision for a task no worker takes now: unschedulable when no worker's total could
// ever hold it, wait otherwise.
function noFit(req, total, free, nw) {
  // An empty cluster is not a verdict on the task: workers may join.
  if (nw === 0) return { tag: 'wait', val: 'no active worker' };
  let everFits = false;
  for (let i = 0; i < nw && !everFits; i++) everFits = fits(req, total, i);
  if (!everFits) return { tag: 'unschedulable', val: shortfall(req, total, nw, 'in total', 'largest') };
  return { tag: 'wait', val: shortfall(req, free, nw, 'free', 'largest free') };
}

// "no worker has 4 GB memory free (largest free: 2.5 GB)", naming every resource no worker has
// enough of, or the whole request when each resource alone exists somewhere.
function shortfall(req, cols, nw, word, largest) {
  const short = [];
  for (let r = 0; r < 4; r++) {
    let max = 0;
    for (let i = 0; i < nw; i++) max = Math.max(max, cols[r][i]);
    if (req[r] > max) {
      short.push(`${describe(r, req[r])} ${word} (${largest}: ${describeShort(r, max)})`);
    }
  }
  if (short.length === 0) {
    return `no single worker has ${describeRequest(req)} ${word} at once`;
  }
  return `no worker has ${short.join(', ')}`;
}
