"""Policy files: limits, priority classes and actions that ops write once and cgctl applies to every
container they match, at its start and, under the daemon, live (docs/policies.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cgctl.limits import leaf_name
from cgctl.policy.loader import PolicyError, PolicySet, Problem, default_directory, load, load_directory
from cgctl.policy.resolve import EXPLICIT, Resolution, Subject, matches, resolve
from cgctl.spec import SpecError, WorkloadSpec

__all__ = [
    "EXPLICIT",
    "PolicyError",
    "PolicySet",
    "Problem",
    "Resolution",
    "Subject",
    "apply_to",
    "blamed",
    "default_directory",
    "leaf_name",
    "load",
    "load_directory",
    "matches",
    "resolve",
]


def apply_to(spec: WorkloadSpec, name: str, policies: PolicySet) -> tuple[WorkloadSpec, dict[str, Any]]:
    """The spec with its policies' limits under the ones it gives, and what its run record keeps of
    that: the explicit limits (so a later reload knows what not to touch) and the sources."""
    explicit = spec.limits.model_dump(mode="json", exclude_unset=True)
    resolution = resolve(policies, Subject.of(spec.model_dump(mode="json"), name), explicit)
    effective = spec.model_copy(update={"limits": resolution.limits})
    return effective, {"explicit": explicit, "policy": resolution.record()}


@contextlib.contextmanager
def blamed(noted: dict[str, Any]) -> Iterator[None]:
    """A limit this host refuses names the policy that set it, not a command-line option."""
    try:
        yield
    except SpecError as error:
        leaf = _leaf(error)
        source = noted.get("policy", {}).get("sources", {}).get(leaf_name(leaf)) if leaf else None
        if source is None:
            raise
        raise SpecError((f"policy {source}",), error.value, f"{leaf_name(leaf)}: {error.reason}") from None


def _leaf(error: SpecError) -> tuple[str, ...]:
    """The limit a SpecError is about: ("limits", "io", "max", INDEX) names the entry of the limits
    in force, which the record does not keep, so its device (the error's value) is the leaf's."""
    field = tuple(map(str, error.field))
    if field[:2] == ("limits", "io") and len(field) == 4:
        return ("io", field[2], str(error.value))
    return field[1:3] if field[:1] == ("limits",) and len(field) >= 3 else ()
