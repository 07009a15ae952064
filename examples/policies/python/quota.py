"""Quota, a CloudAI admission policy (world `admission` of wit/policy.wit): per-user caps on
tasks and on what a user's running tasks reserve, the same semantics as policies/quota and
examples/policies/js/quota.js.

Configuration (JSON, every key optional, `{}` caps nothing):
  {"default": {"max_running_tasks": 10, "max_queued_and_running_tasks": 50,
               "max_cpu": 32, "max_memory": 128, "max_storage": 1000, "max_gpu": 2,
               "max_priority": 10},
   "users": {"alice": {"max_gpu": 4}, "ci-bot": {"max_cpu": null}}}
`default` applies to every user; an entry of `users` overrides it key by key (`null` lifts
that cap). Unknown keys, negative or non-numeric values and fractional counts are refused;
`max_priority` (the highest task priority the user may submit) is any 32-bit whole number.

A task is rejected when its request alone exceeds a resource cap, a task cap is 0 or its
priority exceeds `max_priority`;
deferred when it fits the caps but not on top of the user's current usage; accepted otherwise.
"""

import json
import math

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    AdmissionDecision_Accept,
    AdmissionDecision_Defer,
    AdmissionDecision_Reject,
)

from common import RESOURCES, describe_short

COUNT_KEYS = ("max_running_tasks", "max_queued_and_running_tasks")
AMOUNT_KEYS = tuple(f"max_{r}" for r in RESOURCES)
PRIORITY_KEY = "max_priority"
CAP_KEYS = COUNT_KEYS + AMOUNT_KEYS + (PRIORITY_KEY,)

# The parsed configuration, kept by `configure` for the calls on this instance.
_quota = ({}, {})


def _error(message):
    return Err(f"quota configuration: {message}")


def _is_number(v):
    # JSON booleans are ints in Python: they are not numbers here.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _caps_over(written, base, path):
    """The caps written at `path` over `base`: a key written replaces the base's (null:
    uncapped), a key left out keeps it."""
    if not isinstance(written, dict):
        raise _error(f"{path} must be an object of caps")
    caps = dict(base)
    for key, v in written.items():
        if key not in CAP_KEYS:
            raise _error(
                f"unknown key `{key}` in {path} (expected one of {', '.join(CAP_KEYS)})"
            )
        if v is None:
            caps.pop(key, None)
        elif key in COUNT_KEYS:
            if not _is_number(v) or not math.isfinite(v) or v < 0 or v != int(v) or v > 1e9:
                raise _error(f"{path}.{key} must be a whole number >= 0")
            caps[key] = int(v)
        elif key == PRIORITY_KEY:
            if (
                not _is_number(v)
                or not math.isfinite(v)
                or v != int(v)
                or not -(2**31) <= v <= 2**31 - 1
            ):
                raise _error(
                    f"{path}.{key} must be a whole number from -2147483648 to 2147483647"
                )
            caps[key] = int(v)
        else:
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise _error(f"{path}.{key} must be a number >= 0")
            caps[key] = float(v)
    return caps


def parse(text):
    """The configuration: (default caps, {user: caps with the default merged in})."""
    try:
        c = json.loads(text)
    except ValueError as e:
        raise _error(f"not JSON: {e}")
    if not isinstance(c, dict):
        raise _error("expected a JSON object")
    for key in c:
        if key not in ("default", "users"):
            raise _error(f"unknown key `{key}` (expected `default` or `users`)")
    default = _caps_over(c.get("default", {}), {}, "default")
    written = c.get("users", {})
    if not isinstance(written, dict):
        raise _error("users must be an object of user id to caps")
    users = {}
    for user, caps in written.items():
        if user == "":
            raise _error("users: a user id must not be empty")
        users[user] = _caps_over(caps, default, f"users.{user}")
    return default, users


class Config(exports.Config):
    def configure(self, text: str) -> None:
        global _quota
        _quota = parse(text)


class WitWorld(wit_world.WitWorld):
    def admit(self, task, usage):
        return admit(_quota, task, usage)



def admit(quota, task, usage):
    default, users = quota
    user = task.user
    caps = users.get(user, default)
    req = (task.request.cpu, task.request.memory, task.request.storage, task.request.gpu)
    reserved = (usage.reserved.cpu, usage.reserved.memory, usage.reserved.storage, usage.reserved.gpu)

    # What no drop in usage can cure.
    never = [f"quota {key} for user {user} is 0" for key in COUNT_KEYS if caps.get(key) == 0]
    for r, key in enumerate(AMOUNT_KEYS):
        cap = caps.get(key)
        if cap is not None and req[r] > cap:
            never.append(
                f"{RESOURCES[r]} request of {describe_short(r, req[r])} exceeds the quota "
                f"{key} of {describe_short(r, cap)} for user {user}"
            )
    cap = caps.get(PRIORITY_KEY)
    if cap is not None and task.priority > cap:
        never.append(
            f"priority {task.priority} exceeds the quota max_priority of {cap} for user {user}"
        )
    if never:
        return AdmissionDecision_Reject("; ".join(never))

    # What the user's current usage leaves no room for.
    later = []
    running, queued = usage.running_tasks, usage.queued_tasks
    cap = caps.get("max_running_tasks")
    if cap is not None and running >= cap:
        later.append(f"quota max_running_tasks = {cap} for user {user}: {running} running")
    cap = caps.get("max_queued_and_running_tasks")
    if cap is not None and queued + running >= cap:
        later.append(
            f"quota max_queued_and_running_tasks = {cap} for user {user}: "
            f"{queued} queued + {running} running"
        )
    for r, key in enumerate(AMOUNT_KEYS):
        cap = caps.get(key)
        # A task that requests none of a resource adds nothing to it, even when the user is
        # above that cap (lowered since): only what the task asks for is checked.
        if cap is not None and req[r] > 0 and reserved[r] + req[r] > cap:
            later.append(
                f"quota {key} = {describe_short(r, cap)} for user {user}: "
                f"{describe_short(r, reserved[r])} reserved by running tasks + "
                f"{describe_short(r, req[r])} requested"
            )
    if later:
        return AdmissionDecision_Defer("; ".join(later) + "; admitted once usage drops")
    return AdmissionDecision_Accept()
