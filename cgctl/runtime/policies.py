"""Policies on running containers, from their run records: what a policy set would change (diff),
making it so (apply, through the same path as `cgctl update`), and why each limit is what it is
(explain). Foreground and detached containers alike; the daemon calls these under its locks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from cgctl import state
from cgctl.accounting import running_containers
from cgctl.cgroup import fs
from cgctl.limits import leaves
from cgctl.policy import PolicySet, Resolution, Subject, leaf_name, resolve
from cgctl.runtime.api import ExplainedLimit, Explanation, LimitChange, Overridden, PolicyPlan
from cgctl.spec import Limits, SpecError


def resolution(record: dict[str, Any], name: str, policies: PolicySet) -> Resolution:
    """The limits a running container should have: its explicit ones (a record written before
    policies existed counts all of them as explicit) over its policies, under what actions set."""
    explicit = record.get("explicit")
    if explicit is None:
        explicit = record["spec"]["limits"]
    return resolve(policies, Subject.of(record["spec"], name), explicit, record.get("action_limits") or {})


def plan(name: str, policies: PolicySet, state_dir: Path) -> tuple[PolicyPlan, Resolution]:
    """What applying `policies` would change on the running container `name` (nothing is written)."""
    record = state.read(state.record_path(state_dir, name))
    wanted = resolution(record, name, policies)
    current = leaves(Limits.model_validate(record["spec"]["limits"]).model_dump(mode="json"))
    new = leaves(wanted.limits.model_dump(mode="json"))
    changes = [
        LimitChange(
            limit=leaf_name(leaf),
            old=current.get(leaf),
            new=new.get(leaf),
            source=wanted.winners[leaf].source if leaf in wanted.winners else "default",
        )
        for leaf in dict.fromkeys([*current, *new])
        if current.get(leaf) != new.get(leaf)
    ]
    applied = [located.source for located in wanted.policies]
    return PolicyPlan(name=name, policies=applied, changes=changes), wanted


def diff(candidate: PolicySet, state_dir: Path) -> list[PolicyPlan]:
    """What `candidate` would change on each running container; nothing is written."""
    plans = []
    for name in running(state_dir):
        with contextlib.suppress(LookupError, OSError, ValueError):  # it ended meanwhile
            plans.append(plan(name, candidate, state_dir)[0])
    return plans


def apply(name: str, policies: PolicySet, state_dir: Path) -> PolicyPlan:
    """Bring the running container `name` to what `policies` say; a write the kernel refuses is
    rolled back and reported in the plan's `error`, the container keeping its limits."""
    from cgctl.runtime.update import set_limits

    try:
        done, wanted = plan(name, policies, state_dir)
        if done.changes:
            set_limits(name, wanted.limits, {"policy": wanted.record()}, state_dir)
        else:
            state.update(state.record_path(state_dir, name), policy=wanted.record())
    except (LookupError, OSError, ValueError, SpecError, fs.CgroupError) as error:
        return PolicyPlan(name=name, policies=[], changes=[], error=str(error))
    return done


def running(state_dir: Path) -> list[str]:
    return sorted(container.name for container in running_containers(state_dir))


def explain(name: str, policies: PolicySet, state_dir: Path, actions: list[str] | None = None) -> Explanation:
    """Per limit in force: its value, who set it, and whom it won over. LookupError if not running."""
    path = state.record_path(state_dir, name)
    if name not in running(state_dir):
        raise LookupError(f"no running container named {name!r}")
    record = state.read(path)
    wanted = resolution(record, name, policies)
    limits = [
        ExplainedLimit(
            limit=leaf_name(leaf),
            value=setting.value,
            source=setting.source,
            overridden=[Overridden(value=o.value, source=o.source) for o in wanted.overridden.get(leaf, [])],
        )
        for leaf, setting in sorted(wanted.winners.items())
    ]
    if actions is None:
        actions = [
            f"{located.source}: {action.when.kind()} -> {action.do.kind()} (needs the daemon)"
            for located in wanted.policies
            for action in located.policy.actions
        ]
    return Explanation(
        name=name, policies=[located.source for located in wanted.policies], limits=limits, actions=actions
    )
