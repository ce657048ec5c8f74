"""What the namespace steps need to know about the workload."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Context:
    private: frozenset[str]  # the workload's namespaces: new ones, and joined ones
    hostname: str
    joined: dict[str, str] = field(default_factory=dict)  # kind -> a namespace file to setns into
    own_mounts: bool = False  # the spec gives its mounts: the steps mount no /proc, /sys, cgroup2
    domainname: str | None = None
