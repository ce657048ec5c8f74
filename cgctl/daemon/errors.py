"""The API's errors as JSON, {"message": ..., "exit_code": ...}, with the HTTP status of each kind
(see server.py's docstring): the same for a request, a stream and a WebSocket's first message."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cgctl.cgroup import fs
from cgctl.network import NetworkError, cni
from cgctl.runtime.api import Failure, Invalid
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import SpecError


def error_response(status: int, message: str, exit_code: int = 125) -> JSONResponse:
    return JSONResponse({"message": message, "exit_code": exit_code}, status_code=status)


def problem(error: Exception) -> tuple[int, str, int]:
    """(HTTP status, message, exit status) of what a call raised: the same for a request and a stream."""
    if isinstance(error, Failure):
        return error.status, str(error), error.exit_code
    if isinstance(error, SpecError):
        field = ".".join(str(part) for part in error.field)
        return 400, f"invalid value {error.value!r} for {field}: {error.reason}", 125
    if isinstance(error, SpawnError):
        return 400, str(error), error.exit_code
    if isinstance(error, NetworkError):  # names the option and the value (--network, --publish)
        return 400, str(error), 125
    if isinstance(error, cni.CniError):
        return 500, str(error), 125
    if isinstance(error, ValidationError):
        return 400, validation_message(list(error.errors())), 125
    if isinstance(error, fs.CgroupError):
        return 500, str(error), 125
    raise error


def validation_message(errors: list[Any]) -> str:
    """'invalid value X for spec.limits.memory.max: reason', one clause per error."""
    clauses = []
    for detail in errors:
        location = ".".join(str(part) for part in detail["loc"] if part not in ("body", "query", "path"))
        reason = str(detail["msg"]).removeprefix("Value error, ")
        given = detail.get("input")
        if detail["type"] == "extra_forbidden":
            clauses.append(f"unknown field {location!r}")
        elif detail["type"] == "missing":
            clauses.append(f"missing field {location!r}")
        elif location.split(".")[0] == "auth":
            clauses.append(f"invalid {location}: {reason}")  # never echoed
        elif isinstance(given, str | int | float | bool):
            clauses.append(f"invalid value {given!r} for {location}: {reason}")
        else:
            clauses.append(f"invalid {location or 'body'}: {reason}")
    return "; ".join(clauses)


def invalid_query(field: str, value: str, reason: str) -> Failure:
    return Invalid(f"invalid value {value!r} for {field}: {reason}")
