"""Unit tests of the policies' logic under CPython (`python -m unittest`), with the bindings
`componentize-py bindings` generates on the path (scripts/build-example-policies.sh does it):
the same modules the components embed, called with the bindings' own types."""

import unittest

from wit_world.imports.types import (
    AdmissionDecision_Accept,
    AdmissionDecision_Defer,
    AdmissionDecision_Reject,
    AdmissionTask,
    LabelIndex,
    PlacementDecision_Assign,
    PlacementDecision_Unschedulable,
    PlacementDecision_Wait,
    PlacementInput,
    Resources,
    TaskColumns,
    UserUsage,
    WorkerColumns,
)
from componentize_py_types import Err

import quota
import spread


def make_input(workers, tasks):
    """Rows {"total": [cpu, memory, storage, gpu], "free": [...], "labels": {k: v}} into the
    WIT columns."""
    strings = []

    def intern(s):
        if s not in strings:
            strings.append(s)
        return strings.index(s)

    def labels(rows):
        offsets, pairs = [0], []
        for row in rows:
            pairs += [(intern(k), intern(v)) for k, v in row.get("labels", {}).items()]
            offsets.append(len(pairs))
        return LabelIndex(offsets, pairs)

    def col(rows, field, r):
        return [row[field][r] for row in rows]

    n = len(workers)
    zeros = [0.0] * n
    w = WorkerColumns(
        *(col(workers, "total", r) for r in range(4)),
        *([t - f for t, f in zip(col(workers, "total", r), col(workers, "free", r))] for r in range(4)),
        *(col(workers, "free", r) for r in range(4)),
        zeros, [0] * n, labels(workers), [],
    )
    m = len(tasks)
    t = TaskColumns(
        *(col(tasks, "req", r) for r in range(4)),
        [0] * m, [0] * m, [0.0] * m, [0] * m, [0] * m, [0] * m, labels(tasks),
    )
    return PlacementInput(strings, w, t)


def idle(total, labels=None):
    return {"total": total, "free": total, "labels": labels or {}}


class SpreadTests(unittest.TestCase):
    def test_a_batch_is_spread_in_turn_over_equal_workers(self):
        workers = [idle([4, 8, 0, 0])] * 3
        d = spread.place(make_input(workers, [{"req": [1, 1, 0, 0]}] * 4))
        self.assertEqual([x.value for x in d], [0, 1, 2, 0])

    def test_the_least_loaded_worker_wins(self):
        workers = [
            {"total": [8, 16, 0, 0], "free": [4, 16, 0, 0]},
            {"total": [8, 16, 0, 0], "free": [6, 12, 0, 0]},
        ]
        d = spread.place(make_input(workers, [{"req": [1, 1, 0, 0]}]))
        self.assertEqual(d, [PlacementDecision_Assign(1)])

    def test_workers_with_the_task_labels_come_first(self):
        workers = [
            idle([8, 16, 0, 0], {"zone": "a"}),
            {"total": [8, 16, 0, 0], "free": [1, 2, 0, 0], "labels": {"zone": "b"}},
        ]
        tasks = [{"req": [1, 1, 0, 0], "labels": {"zone": "b"}}] * 2
        d = spread.place(make_input(workers, tasks))
        self.assertEqual([x.value for x in d], [1, 0])

    def test_never_more_than_available_counting_the_batch(self):
        workers = [{"total": [4, 8, 0, 0], "free": [1.5, 8, 0, 0]}] * 2
        d = spread.place(make_input(workers, [{"req": [1, 1, 0, 0]}] * 10))
        self.assertEqual(sum(isinstance(x, PlacementDecision_Assign) for x in d), 2)
        self.assertEqual(
            d[2], PlacementDecision_Wait("no worker has 1 CPU free (largest free: 0.5 CPU)")
        )

    def test_a_request_no_worker_could_ever_hold_is_unschedulable(self):
        d = spread.place(make_input([idle([4, 8, 0, 1])], [{"req": [1, 1, 0, 2]}]))
        self.assertEqual(
            d, [PlacementDecision_Unschedulable("no worker has 2 GPU in total (largest: 1 GPU)")]
        )
        d = spread.place(make_input([], [{"req": [1, 0, 0, 0]}]))
        self.assertEqual(d, [PlacementDecision_Wait("no active worker")])

    def test_spread_takes_no_settings(self):
        spread.Config().configure("{}")
        with self.assertRaises(Err) as e:
            spread.Config().configure('{"x": 1}')
        self.assertIn("unknown key `x`", e.exception.value)


def task(user, req, priority=0):
    return AdmissionTask("t", user, "busybox", Resources(*req), priority, [], 0, 0.0)


def usage(running, queued, reserved):
    return UserUsage(running, queued, 0, Resources(*reserved))


CONFIG = """{"default": {"max_running_tasks": 3, "max_queued_and_running_tasks": 5,
                         "max_cpu": 8, "max_memory": 32, "max_gpu": 0},
             "users": {"alice": {"max_gpu": 2, "max_cpu": null}, "bob": {"max_running_tasks": 1}}}"""


class QuotaTests(unittest.TestCase):
    def test_rejects_defers_and_accepts_as_the_rust_quota_does(self):
        q = quota.parse(CONFIG)
        self.assertEqual(
            quota.admit(q, task("carol", [16, 1, 0, 0]), usage(0, 0, [0, 0, 0, 0])),
            AdmissionDecision_Reject(
                "cpu request of 16 CPU exceeds the quota max_cpu of 8 CPU for user carol"
            ),
        )
        self.assertEqual(
            quota.admit(q, task("bob", [1, 1, 0, 0]), usage(1, 0, [1, 1, 0, 0])),
            AdmissionDecision_Defer(
                "quota max_running_tasks = 1 for user bob: 1 running; admitted once usage drops"
            ),
        )
        self.assertEqual(
            quota.admit(q, task("alice", [64, 1, 0, 2]), usage(0, 0, [0, 0, 0, 0])),
            AdmissionDecision_Accept(),
        )
        d = quota.admit(q, task("dave", [2, 1, 0, 0]), usage(1, 0, [7.5, 1, 0, 0]))
        self.assertIsInstance(d, AdmissionDecision_Defer)

    def test_rejects_a_priority_above_max_priority_overridden_or_lifted_per_user(self):
        q = quota.parse(
            '{"default": {"max_priority": 10},'
            ' "users": {"bob": {"max_priority": -5}, "ci-bot": {"max_priority": null}}}'
        )
        idle = usage(0, 0, [0, 0, 0, 0])
        self.assertEqual(
            quota.admit(q, task("carol", [1, 1, 0, 0], 10), idle), AdmissionDecision_Accept()
        )
        self.assertEqual(
            quota.admit(q, task("carol", [1, 1, 0, 0], 50), idle),
            AdmissionDecision_Reject(
                "priority 50 exceeds the quota max_priority of 10 for user carol"
            ),
        )
        self.assertEqual(
            quota.admit(q, task("bob", [1, 1, 0, 0], 0), idle),
            AdmissionDecision_Reject("priority 0 exceeds the quota max_priority of -5 for user bob"),
        )
        self.assertEqual(
            quota.admit(q, task("ci-bot", [1, 1, 0, 0], 2**31 - 1), idle),
            AdmissionDecision_Accept(),
        )

    def test_refuses_bad_configuration_with_the_key_at_fault(self):
        for text, message in [
            ('{"default": {"max_cpu": -1}}', "default.max_cpu must be a number >= 0"),
            ('{"default": {"max_running_tasks": 1.5}}', "whole number"),
            ('{"default": {"max_cpu": true}}', "default.max_cpu must be a number"),
            ('{"default": {"max_priority": 2.5}}', "default.max_priority must be a whole number"),
            ('{"default": {"max_priority": 3e9}}', "default.max_priority must be a whole number"),
            ('{"default": {"max_priority": true}}', "default.max_priority must be a whole number"),
            ('{"users": {"bob": {"max_cpus": 1}}}', "unknown key `max_cpus` in users.bob"),
            ('{"defaults": {}}', "unknown key `defaults`"),
            ("[1]", "expected a JSON object"),
            ("{", "not JSON"),
        ]:
            with self.assertRaises(Err, msg=text) as e:
                quota.parse(text)
            self.assertIn(message, e.exception.value, text)


if __name__ == "__main__":
    unittest.main()
