"""Property-based: whatever JSON, names and query strings a client sends, the API answers with a
JSON error and a 4xx, or does what was asked; never a 5xx, never a leftover."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.daemon import Daemon
from tests.integration.test_daemon import api_call as request

pytestmark = pytest.mark.usefixtures("no_leaks")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Fields a body may carry, each given a random value; the command is never fuzzed (it would run).
SPEC_FIELDS = ["name", "limits", "namespaces", "hostname", "env", "workdir", "labels", "init", "user",
               "rootfs", "volumes", "security", "surprise"]  # fmt: skip
LIMIT_PATHS = [("memory", "max"), ("memory", "swap_max"), ("memory", "oom_group"), ("cpu", "cpus"),
               ("cpu", "weight"), ("cpu", "cpuset"), ("io", "max"), ("pids", "max"),
               ("files", "x")]  # fmt: skip


def answered_well(daemon: Daemon, status: int, answer: Any, created: str | None = None) -> None:
    assert status < 500, answer
    if status >= 400:
        assert isinstance(answer, dict) and answer["message"], answer
    elif status == 201 and created is not None:
        request(daemon, "DELETE", f"/v1/containers/{urllib.parse.quote(created, safe='')}?force=true")


@given(fields=st.dictionaries(st.sampled_from(SPEC_FIELDS), json_values, max_size=4), top=json_values)
@FUZZ
def test_create_with_random_fields(daemon: Daemon, fields: dict[str, Any], top: Any) -> None:
    body = {"spec": {"command": ["true"], **fields}, **({"restart": top} if top is not None else {})}
    status, answer = request(daemon, "POST", "/v1/containers", body)
    answered_well(daemon, status, answer, answer.get("name") if isinstance(answer, dict) else None)


@given(limits=st.dictionaries(st.sampled_from(LIMIT_PATHS), json_values | st.text(max_size=12), max_size=3))
@FUZZ
def test_create_with_random_limits(daemon: Daemon, limits: dict[tuple[str, str], Any]) -> None:
    nested: dict[str, dict[str, Any]] = {}
    for (group, field), value in limits.items():
        nested.setdefault(group, {})[field] = value
    status, answer = request(
        daemon, "POST", "/v1/containers", {"spec": {"command": ["true"], "limits": nested}}
    )
    answered_well(daemon, status, answer, answer.get("name") if isinstance(answer, dict) else None)


@given(
    name=st.text(min_size=1, max_size=80),
    verb=st.sampled_from(["kill", "freeze", "thaw", "update", "wait", "logs", "stats", ""]),
    body=json_values,
    query=st.dictionaries(
        st.sampled_from(["tail", "since", "follow", "all", "label", "force", "timeout", "interval"]),
        st.text(max_size=10),
        max_size=3,
    ),
)
@FUZZ
def test_random_names_verbs_bodies_and_queries(
    daemon: Daemon, name: str, verb: str, body: Any, query: dict[str, str]
) -> None:
    path = "/v1/containers/" + urllib.parse.quote(name, safe="") + (f"/{verb}" if verb else "")
    method = "GET" if verb in ("logs", "stats", "") else "POST"
    if query.get("follow", "").lower() in ("true", "1", "yes", "on"):
        query["follow"] = "false"  # a follow of a live container would wait for it to end
    status, answer = request(daemon, method, f"{path}?{urllib.parse.urlencode(query)}", body)
    answered_well(daemon, status, answer)


@given(raw=st.binary(max_size=200))
@FUZZ
def test_bodies_that_are_not_json(daemon: Daemon, raw: bytes) -> None:
    status, answer = request(daemon, "POST", "/v1/containers", raw)
    answered_well(daemon, status, answer, answer.get("name") if isinstance(answer, dict) else None)


def test_nothing_was_left(daemon: Daemon) -> None:
    assert daemon.api.list(all=True) == []
    assert list((daemon.data_dir / "containers").iterdir()) == []
