"""`cgctl policy validate|diff|apply|explain|status`: policy files (docs/policies.md). validate reads
files here; the others act through the daemon when one answers (it holds the active set, keeps it
applied and takes the actions), else on this host's running containers once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cgctl.cli import connection
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.runtime.api import PolicyPlan

Json = Annotated[bool, typer.Option("--json", help="print JSON")]
EXIT_INVALID = 1

app = typer.Typer(help="Validate, preview, apply and explain policy files (docs/policies.md).")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="policy")


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="policy files or directories [default: the policy directory]", show_default=False
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Check policy files as the daemon would load them.

    Every error as FILE:LINE:COLUMN, the field, the value and what is allowed; exit 1 if any."""
    from cgctl import policy
    from cgctl.policy.loader import policy_files

    given = paths or [policy.default_directory()]
    missing = [path for path in given if not path.exists()]
    files = policy_files([path for path in given if path.exists()])
    problems = [policy.Problem(str(path), 0, 0, "", "no such file or directory") for path in missing]
    loaded = None
    try:
        loaded = policy.load(files)
    except policy.PolicyError as error:
        problems += error.problems
    if as_json:
        names = [located.source for located in loaded.policies] if loaded else []
        print(
            json.dumps(
                {"files": list(map(str, files)), "problems": list(map(str, problems)), "policies": names}
            )
        )
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            count = len(loaded.policies) if loaded else 0
            print(f"{len(files)} file(s), {count} polic{'y' if count == 1 else 'ies'}: valid")
    if problems:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def diff(
    directory: Annotated[
        Path | None,
        typer.Argument(help="policy files to compare [default: the policy directory]", show_default=False),
    ] = None,
    as_json: Json = False,
) -> None:
    """Show what policy files would change on each running container; nothing is written.

    Stage a change in a copy of the policy directory, see what it does, then move it into place
    (the daemon applies its directory as soon as it changes)."""
    given = str(directory.resolve()) if directory else None
    _show_plans(_call(lambda runtime: runtime.policy_diff(given)), as_json, "would change")


@app.command()
def apply(as_json: Json = False) -> None:
    """Reload the policy directory and apply it to every running container.

    The daemon keeps it applied (it also reloads on SIGHUP and when the directory changes); without
    a daemon it is applied once. A bad file changes nothing (exit 1)."""
    _show_plans(_call(lambda runtime: runtime.policy_apply()), as_json, "changed")


@app.command()
def explain(name: Annotated[str, typer.Argument(help="a running container")], as_json: Json = False) -> None:
    """Show each limit in force on NAME, who set it and what it overrode.

    The setter is a policy (FILE:NAME, with its priority class), 'explicit' (run's options, the
    API's spec, update) or 'action'."""
    explanation = _call(lambda runtime: runtime.explain(name))
    if as_json:
        print(explanation.model_dump_json(indent=2))
        return
    print(f"{name}: policies {', '.join(explanation.policies) or '(none match)'}")
    rows = [
        [
            item.limit,
            _value(item.value, item.limit),
            item.source,
            "; ".join(f"{_value(o.value, item.limit)} from {o.source}" for o in item.overridden) or "-",
        ]
        for item in explanation.limits
    ]
    if rows:
        print(render_table([["LIMIT", "VALUE", "SET BY", "OVERRIDDEN"], *rows]))
    else:
        print("no limits set: the kernel's defaults")
    for action in explanation.actions:
        print(f"action: {action}")


@app.command()
def status(as_json: Json = False) -> None:
    """Show the daemon's active policies and its last reload."""
    current = _call(lambda runtime: runtime.policy_status())
    if as_json:
        print(current.model_dump_json(indent=2))
        return
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.reloaded_at or 0))
    print(f"directory: {current.directory}")
    print(f"last reload: {when}, {'applied' if current.ok else 'REFUSED (the previous set stays)'}")
    for problem in current.problems:
        print(f"  {problem}")
    print(f"policies: {', '.join(current.policies) or '(none)'}")


def _call(what: Any) -> Any:
    from cgctl.runtime.api import Invalid

    try:
        return what(connection.runtime())
    except Invalid as error:
        print(f"cgctl: {error}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID) from None
    except connection.Failure as error:
        raise connection.failed(error) from None


def _show_plans(plans: list[PolicyPlan], as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps([plan.model_dump(mode="json") for plan in plans], indent=2))
    else:
        rows = [
            [
                plan.name,
                change.limit,
                _value(change.old, change.limit),
                _value(change.new, change.limit),
                change.source,
            ]
            for plan in plans
            for change in plan.changes
        ]
        if rows:
            print(render_table([["CONTAINER", "LIMIT", "NOW", "POLICY", "SOURCE"], *rows]))
        changed = sum(bool(plan.changes) for plan in plans)
        print(f"{changed} of {len(plans)} running container(s) {verb}")
        for plan in plans:
            if plan.error:
                print(f"cgctl: {plan.name}: {plan.error}", file=sys.stderr)
    if any(plan.error for plan in plans):
        raise typer.Exit(EXIT_INVALID)


def _value(value: Any, limit: str) -> str:
    """A limit as humans read it: sizes of memory and huge pages in MiB and GiB, io lines as KEY=VALUE."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if v is not None and k != "device") or "-"
    if limit.startswith(("memory.", "hugetlb[")) and isinstance(value, int) and not isinstance(value, bool):
        from cgctl.spec import format_size

        return format_size(value)
    return str(value)
