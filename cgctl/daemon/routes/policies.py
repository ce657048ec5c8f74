"""/v1/policies: the daemon's active policy set; and what a container's policies did to it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from cgctl.daemon.routes import ContainerName, Served
from cgctl.runtime.api import DiffRequest, Explanation, PolicyPlan, PolicyStatus, ReloadResult

router = APIRouter()


@router.get("/v1/containers/{name}/policy")
def explain(service: Served, name: ContainerName) -> Explanation:
    """Per limit in force: its value, the policy (or explicit option) that set it, what it overrode."""
    return service.explain(name)


@router.get("/v1/policies")
def policy_status(service: Served) -> PolicyStatus:
    return service.engine.status


@router.post("/v1/policies/reload")
def policy_reload(service: Served) -> ReloadResult:
    """Load the policy directory and apply it to every running container; 400 if a file is bad (the
    active policies stay)."""
    return service.engine.reload()


@router.post("/v1/policies/diff")
def policy_diff(service: Served, request: DiffRequest | None = None) -> list[PolicyPlan]:
    """What a policy directory (default: the daemon's) would change on each running container; nothing
    is written."""
    directory = (request or DiffRequest()).directory
    return service.engine.diff(Path(directory) if directory else None)
