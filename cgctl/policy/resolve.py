"""Which policies apply to a container, and the limits that result, field by field.

Precedence, lowest first: policies from least to most specific (the number of match conditions),
ties in the set's order (files by name, then policies in their file), so the later one wins, as
with systemd drop-ins; within a policy its priority class, then its own limits; over them the
limits given explicitly (`cgctl run` options, the API's spec, `cgctl update`); and on top what a
policy's action set, which is the point of the action. Each limit is a
"leaf" (memory.max, io.max of one device, one --cgroup-set file), so policies combine per leaf.
A policy's bandwidth reaches only containers with a network of their own (the others have no
interface to shape).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from cgctl.limits import Leaf, applied_by, leaf_name, leaves, unleaf
from cgctl.netspec import NetworkSpec
from cgctl.policy.loader import Located, PolicySet
from cgctl.spec import Limits

EXPLICIT = "explicit"  # the source of a limit given at run or by `cgctl update`
ACTION = "action"  # the source of a limit a policy's action set (until the container's next attempt)


@dataclasses.dataclass(frozen=True)
class Subject:
    """What a policy can match a container on."""

    name: str
    labels: dict[str, str]
    image: str
    user: str
    command: str  # the basename of argv[0]
    networked: bool = True  # a network of its own (bridge, a name; unset: the default's), else no bandwidth

    @classmethod
    def of(cls, spec: dict[str, Any], name: str) -> Subject:
        """From a spec as JSON (a run record's or a request's)."""
        user = (spec.get("user") or "").partition(":")[0] or _caller()
        rootfs = spec.get("rootfs") or {}
        return cls(
            name=name,
            labels=dict(spec.get("labels") or {}),
            image=rootfs.get("image") or "",
            user=user,
            command=os.path.basename(spec["command"][0]),
            networked=NetworkSpec.model_validate(spec.get("network") or {}).carries_ports(),
        )


def _caller() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def matches(located: Located, subject: Subject) -> bool:
    match = located.policy.match
    if match.name is not None and not fnmatch.fnmatchcase(subject.name, match.name):
        return False
    for key, pattern in match.labels.items():
        if key not in subject.labels or not fnmatch.fnmatchcase(subject.labels[key], pattern):
            return False
    if match.image is not None:
        image = subject.image
        if ":" not in match.image and ":" in image:  # NAME of one given without a tag is all of it
            image = image.rpartition(":")[0]
        if not subject.image or not fnmatch.fnmatchcase(image, match.image):
            return False
    if match.user is not None and subject.user != match.user:
        return False
    return match.command is None or fnmatch.fnmatchcase(subject.command, match.command)


@dataclasses.dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "web.yaml:web", "web.yaml:web (priority critical)" or EXPLICIT


@dataclasses.dataclass
class Resolution:
    """The limits in force and, per leaf, who set it and whom it overrode."""

    limits: Limits
    winners: dict[Leaf, Setting]
    overridden: dict[Leaf, list[Setting]]
    policies: list[Located]  # every matching policy, lowest precedence first

    @property
    def names(self) -> list[str]:
        return [located.policy.name for located in self.policies]

    def record(self) -> dict[str, Any]:
        """What a run record keeps: the policies applied and the source of each limit they set."""
        return {
            "applied": [located.source for located in self.policies],
            "sources": {
                leaf_name(leaf): setting.source
                for leaf, setting in self.winners.items()
                if setting.source not in (EXPLICIT, ACTION)
            },
        }


def resolve(
    policies: PolicySet, subject: Subject, explicit: dict[str, Any], actions: dict[str, Any] | None = None
) -> Resolution:
    """The limits for subject: `explicit` (limits as JSON, only the fields given) over its policies,
    and what its policies' actions set over both."""
    matching = sorted(
        (located for located in policies.policies if matches(located, subject)),
        key=lambda located: (located.policy.match.conditions(), located.order),
    )
    winners: dict[Leaf, Setting] = {}
    overridden: dict[Leaf, list[Setting]] = {}

    def apply(found: dict[Leaf, Any], source: str) -> None:
        for leaf, value in found.items():
            if not subject.networked and applied_by(leaf) == "network" and source != EXPLICIT:
                continue  # no interface to shape; given explicitly, the run or update refuses it
            if leaf in winners:
                overridden.setdefault(leaf, []).insert(0, winners[leaf])
            winners[leaf] = Setting(value, source)

    for located in matching:
        policy = located.policy
        if policy.priority is not None:
            apply(
                leaves(policies.classes[policy.priority].limits()),
                f"{located.source} (priority {policy.priority})",
            )
        apply(located.limits, located.source)
    apply(leaves(explicit), EXPLICIT)
    apply(leaves(actions or {}), ACTION)
    limits = Limits.model_validate(unleaf({leaf: setting.value for leaf, setting in winners.items()}))
    return Resolution(limits, winners, overridden, matching)
