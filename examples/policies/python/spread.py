"""Spread with label affinity, a CloudAI placement policy (world `placement` of
wit/policy.wit); the same decisions as examples/policies/js/spread.js.

Each task, in queue order, goes to the first worker in this order whose free capacity holds the
whole request:
  1. the workers that carry the most of the task's labels (same key and value) first;
  2. then the least loaded first: load = the worker's most loaded resource, max over the
     resources it has of (total - free) / total, counting the batch's own earlier assignments
     (so equal workers take a batch in turn), rounded down to a multiple of 2^-32;
  3. then the lowest index, so that the same round is always decided the same way.
A task no worker takes now waits, unless no worker's total could ever hold it: then it is
unschedulable. Both reasons name the short resource, as the Rust kit does.

Why "first in an order" rather than scoring every worker for every task: the interpreter pays
about a microsecond per worker visited. The order is built once per round (one integer key per
worker, sorted natively) and an assignment moves one worker in it, so a task visits only the
workers ahead of the first one that fits.
"""

import json
from bisect import bisect_left, insort

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    PlacementDecision_Assign,
    PlacementDecision_Unschedulable,
    PlacementDecision_Wait,
)

from common import describe, describe_request, describe_short


class Config(exports.Config):
    def configure(self, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise Err(f"spread configuration: not JSON: {e}")
        if not isinstance(value, dict):
            raise Err("spread configuration: expected a JSON object")
        for key in value:
            raise Err(f"spread configuration: unknown key `{key}` (the policy takes no settings)")


class WitWorld(wit_world.WitWorld):
    def place(self, input):
        return place(input)


def place(input):
    w, t = input.workers, input.tasks
    total = (w.total_cpu, w.total_memory, w.total_storage, w.total_gpu)
    avail = (w.available_cpu, w.available_memory, w.available_storage, w.available_gpu)
    reqs = (t.req_cpu, t.req_memory, t.req_storage, t.req_gpu)
    # The shortest column: a malformed input cannot make us read past the end of one.
    nw = min(len(c) for c in total + avail)
    nt = min(len(c) for c in reqs)
    # Our own copy of the free capacity: the batch's assignments come out of it.
    free = [list(c[:nw]) for c in avail]
    f0, f1, f2, f3 = free
    load = [load_of(total, free, i) for i in range(nw)]

    orders = Orders(input, nw, load)
    decisions = []
    for task, req in enumerate(zip(*reqs)):
        r0, r1, r2, r3 = req
        order = orders.for_task(task)
        mask = order.idx - 1
        best = -1
        for key in order.keys:
            i = key & mask
            if r0 <= f0[i] and r1 <= f1[i] and r2 <= f2[i] and r3 <= f3[i]:
                best = i
                break
        if best >= 0:
            for r in range(4):
                free[r][best] -= req[r]
            before = load[best]
            load[best] = load_of(total, free, best)
            orders.moved(best, before)
            decisions.append(PlacementDecision_Assign(best))
        else:
            decisions.append(no_fit(req, total, free, nw))
    return decisions


def load_of(total, free, i):
    """max over the resources worker `i` has of (total - free) / total, within [0, 1]."""
    load = 0.0
    for r in range(4):
        tot = total[r][i]
        if tot > 0:
            load = max(load, (tot - free[r][i]) / tot)
    return min(load, 1.0)


class Order:
    """The workers in preference order for one label set: sorted integer keys
    `lacking * span + floor(load * q) * idx + worker` (lacking = labels of the set the worker
    does not carry), packed exactly as the JavaScript policy packs them into a float."""

    def __init__(self, lacking, idx, q):
        self.lacking = lacking
        self.idx = idx
        self.q = q
        self.span = 2 * q * idx
        self.keys = []

    def key(self, i, load):
        return self.lacking[i] * self.span + int(load * self.q) * self.idx + i


class Orders:
    """One order per distinct label set among the round's tasks (most rounds have one or two)."""

    def __init__(self, input, nw, load):
        self.input = input
        self.nw = nw
        self.load = load
        self.idx = 1
        while self.idx <= nw:
            self.idx *= 2
        self.n_strings = len(input.strings) + 1
        self.by_set = {}

    def for_task(self, task):
        tl = self.input.tasks.labels
        pairs = tuple(
            sorted(self.pair_id(p) for p in tl.pairs[tl.offsets[task] : tl.offsets[task + 1]])
        )
        order = self.by_set.get(pairs)
        if order is None:
            order = self.build(pairs)
            self.by_set[pairs] = order
        return order

    def pair_id(self, pair):
        return pair[0] * self.n_strings + pair[1]

    def build(self, pairs):
        nw = self.nw
        lacking = [len(pairs)] * nw
        if pairs:
            wanted = set(pairs)
            wl = self.input.workers.labels
            offsets = wl.offsets
            for i in range(nw):
                for p in wl.pairs[offsets[i] : offsets[i + 1]]:
                    if self.pair_id(p) in wanted:
                        lacking[i] -= 1
        levels = 1
        while levels <= len(pairs):
            levels *= 2
        # The JavaScript policy keeps keys below 2^53 (exact in a float): the same rounding here.
        q = 2**32
        while levels * 2 * q * self.idx > 2**53:
            q //= 2
        order = Order(lacking, self.idx, q)
        span, idx = order.span, self.idx
        order.keys = sorted(
            lack * span + int(load * q) * idx + i
            for i, (lack, load) in enumerate(zip(lacking, self.load))
        )
        return order

    def moved(self, i, before):
        """Worker `i`'s load went up from `before`: move it back into place in every order."""
        after = self.load[i]
        for order in self.by_set.values():
            keys = order.keys
            del keys[bisect_left(keys, order.key(i, before))]
            insort(keys, order.key(i, after))


def fits(req, cols, i):
    return all(req[r] <= cols[r][i] for r in range(4))


def no_fit(req, total, free, nw):
    """The decision for a task no worker takes now: unschedulable when no worker's total could
    ever hold it, wait otherwise."""
    if nw == 0:
        # An empty cluster is not a verdict on the task: workers may join.
        return PlacementDecision_Wait("no active worker")
    if not any(fits(req, total, i) for i in range(nw)):
        return PlacementDecision_Unschedulable(shortfall(req, total, nw, "in total", "largest"))
    return PlacementDecision_Wait(shortfall(req, free, nw, "free", "largest free"))


def shortfall(req, cols, nw, word, largest):
    """"no worker has 4 GB memory free (largest free: 2.5 GB)", naming every resource no worker
    has enough of, or the whole request when each resource alone exists somewhere."""
    short = []
    for r in range(4):
        most = max(cols[r][:nw], default=0.0)
        most = max(most, 0.0)
        if req[r] > most:
            short.append(f"{describe(r, req[r])} {word} ({largest}: {describe_short(r, most)})")
    if not short:
        return f"no single worker has {describe_request(req)} {word} at once"
    return "no worker has " + ", ".join(short)
