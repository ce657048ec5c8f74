"""Which policies apply to a container, and the limits that result, field by field.

Precedence, lowest first: policies from least to most specific (the number of match conditions),
ties in the set's order (files by name, then policies in their file), so the later one wins, as
with systemd drop-ins; within a policy its priority class, then its own limits; over them the
limits given explicitly (`cgctl run` options, the API's spec, `cgctl update`); and on top what a
policy's action set, which is the point of the action. Each limit is a
"leaf" (memory.max, io.max of one device, one --cgroup-set file), so policies combine per leaf.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from cgctl.limits import is_map
from cgctl.policy.loader import Located, PolicySet
from cgctl.spec import Limits

EXPLICIT = "explicit"  # the source of a limit given at run or by `cgctl update`
ACTION = "action"  # the source of a limit a policy's action set (until the container's next attempt)
Leaf = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Subject:
    """What a policy can match a container on."""

    name: str
    labels: dict[str, str]
    image: str
    user: str
    command: str  # the basename of argv[0]

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

    def apply(fields: dict[str, Any], source: str) -> None:
        for leaf, value in leaves(fields).items():
            if leaf in winners:
                overridden.setdefault(leaf, []).insert(0, winners[leaf])
            winners[leaf] = Setting(value, source)

    for located in matching:
        policy = located.policy
        if policy.priority is not None:
            apply(
                policies.classes[policy.priority].limits(), f"{located.source} (priority {policy.priority})"
            )
        apply(policy.limits.model_dump(mode="json", exclude_unset=True), located.source)
    apply(explicit, EXPLICIT)
    apply(actions or {}, ACTION)
    limits = Limits.model_validate(unleaf({leaf: setting.value for leaf, setting in winners.items()}))
    return Resolution(limits, winners, overridden, matching)


def leaves(fields: dict[str, Any]) -> dict[Leaf, Any]:
    """Limits as JSON flattened to one entry per limit: io lists per device, files per file."""
    found: dict[Leaf, Any] = {}
    for section, values in fields.items():
        if section == "io":
            for key, entries in values.items():
                for entry in entries:
                    found[("io", key, entry.get("device") or "default")] = entry
        elif section == "files":
            for file, value in values.items():
                found[("files", file)] = value
        else:
            for key, value in values.items():
                found[(section, key)] = value
    return found


def unleaf(found: dict[Leaf, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for leaf, value in found.items():
        if leaf[0] == "io":
            fields.setdefault("io", {}).setdefault(leaf[1], []).append(value)
        else:
            fields.setdefault(leaf[0], {})[leaf[1]] = value
    return fields


def leaf_name(leaf: Leaf) -> str:
    """memory.max, io.max[/dev/vda], hugetlb[2MB], files[memory.swap.high]: how explain and records
    name a limit (cgctl.limits.leaf_file reads these names)."""
    if leaf[0] == "io":
        return f"io.{leaf[1]}[{leaf[2]}]"
    if len(leaf) == 2 and is_map(leaf[0]):
        return f"{leaf[0]}[{leaf[1]}]"
    return ".".join(leaf)
