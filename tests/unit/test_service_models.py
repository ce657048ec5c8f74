"""The service's schemas: request parsing as the CLI and the API give it, and the OpenAPI
description kept in the repository, which must be what the daemon serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cgctl.daemon.server import make_app
from cgctl.runtime.api import CreateRequest, KillRequest, LogOptions, RestartPolicy

OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"


@pytest.mark.parametrize(
    ("text", "name", "retries"),
    [("no", "no", None), ("always", "always", None), ("on-failure", "on-failure", None),
     ("on-failure:5", "on-failure", 5), ("unless-stopped", "unless-stopped", None)],
)  # fmt: skip
def test_restart_policies_from_text(text: str, name: str, retries: int | None) -> None:
    policy = RestartPolicy.model_validate(text)
    assert (policy.name, policy.max_retries, str(policy)) == (name, retries, text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("sometimes", "is not a restart policy"), ("always:3", "only on-failure takes a count"),
     ("on-failure:x", "only on-failure takes a count"), ("on-failure:0", "greater than or equal to 1")],
)  # fmt: skip
def test_bad_restart_policies(text: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        RestartPolicy.model_validate(text)


def test_log_options_take_sizes_and_bounds() -> None:
    assert LogOptions.model_validate({"max_size": "1M", "max_files": 2}).max_size == 1 << 20
    for bad in ({"max_size": "max"}, {"max_size": "1K"}, {"max_files": 0}, {"max_files": 101}):
        with pytest.raises(ValidationError):
            LogOptions.model_validate(bad)


def test_requests_refuse_unknown_fields_and_signals() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CreateRequest.model_validate({"spec": {"command": ["true"]}, "privileged": True})
    assert KillRequest.model_validate({"signal": "term"}).signal == "SIGTERM"
    assert KillRequest.model_validate({"signal": "9"}).signal == "SIGKILL"
    with pytest.raises(ValidationError, match="not a signal"):
        KillRequest.model_validate({"signal": "SIGNOPE"})


def test_the_openapi_description_in_the_repo_is_the_served_one() -> None:
    served = make_app().openapi()
    kept = json.loads(OPENAPI.read_text())
    assert served == kept, (
        f"{OPENAPI} differs from the API the daemon serves: regenerate it with "
        "`.venv/bin/python -m cgctl.daemon.server > docs/openapi.json` and review the diff"
    )
    assert {"/v1/containers", "/v1/containers/{name}/logs", "/v1/events", "/metrics"} <= set(served["paths"])
