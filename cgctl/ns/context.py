"""What the namespace steps need to know about the workload."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    private: frozenset[str]  # the namespaces the workload gets of its own
    hostname: str
