"""The CLI starts with what a verb needs and no more (bench/startup.py times it): importing it loads
no verb module, a verb loads its own module alone, and running ps with no daemon loads neither the
runtime's models nor the remote client; `cgctl --help` loads no verb at all.

Each probe runs in a fresh interpreter, since this process has imported everything already.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from cgctl.cli import VERBS, main

# Never needed to start a verb without a daemon (pydantic: until the verb builds a spec; typer is
# held below 0.29, which imports it to coerce every option, given or not).
HEAVY = {
    "pydantic",
    "httpx",
    "prometheus_client",
    "psutil",
    "yaml",
    "fastapi",
    "uvicorn",
    "rich",
    "http.client",
    "cgctl.runtime.api",
    "cgctl.runtime.remote",
}
VERB_MODULES = {f"cgctl.cli.{module}" for module in VERBS.values()}
# Up to the command: resolve the verb on the root command, then parse its arguments (what typer
# does before it calls the verb's function); the modules loaded after each step.
PARSE = """
from typer import Context
from typer.main import get_command
from cgctl.cli import app
root = get_command(app)
name, *rest = ARGS
verb = root.get_command(Context(root), name)
built = sorted(sys.modules)
verb.make_context(name, rest, parent=root.make_context("cgctl", [name]))
print(json.dumps({"built": built, "parsed": sorted(sys.modules)}))
"""
# A verb as the console script runs it, with no daemon to find (the system socket moved away).
RUN = """
from pathlib import Path
from cgctl.runtime import interface
interface.SYSTEM_SOCKET = Path("/nonexistent/cgctl.sock")
sys.argv = ["cgctl", *ARGS]
from cgctl.cli import main
try:
    main()
except SystemExit as end:
    assert not end.code, end.code
print(json.dumps(sorted(sys.modules)))
"""


def probe(code: str, tmp_path: Path) -> Any:
    """The JSON that code prints last, run in a fresh interpreter with private, empty cgctl
    directories and no daemon to reach."""
    env = {key: value for key, value in os.environ.items() if key not in ("CGCTL_HOST", "CGCTL_TOKEN_FILE")}
    env |= {
        "CGCTL_STATE_DIR": str(tmp_path / "state"),
        "CGCTL_MACHINE_DIR": str(tmp_path / "machine"),
        "XDG_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    done = subprocess.run(
        [sys.executable, "-c", f"import json, sys\n{code}"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_loads_no_verb_and_nothing_heavy(tmp_path: Path) -> None:
    modules = set(probe("import cgctl.cli\nprint(json.dumps(sorted(sys.modules)))", tmp_path))
    assert modules & (HEAVY | VERB_MODULES) == set()


@pytest.mark.parametrize(
    "args",
    [["run", "--mem", "256M", "--", "true"], ["ps"], ["ps", "--json"], ["stats", "--no-stream"]],
    ids=" ".join,
)
def test_a_verb_loads_its_own_module_alone(tmp_path: Path, args: list[str]) -> None:
    modules = probe(PARSE.replace("ARGS", repr(args)), tmp_path)
    others = VERB_MODULES - {f"cgctl.cli.{VERBS[args[0]]}"}
    assert set(modules["built"]) & (HEAVY | others) == set()
    assert set(modules["parsed"]) & (HEAVY | others) == set()


@pytest.mark.parametrize("args", [["ps"], ["ps", "--json"], ["stats", "--no-stream"]], ids=" ".join)
def test_a_verb_without_a_daemon_loads_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    """Neither pydantic (the models, the spec), nor the remote client, nor the exporter's libraries."""
    assert set(probe(RUN.replace("ARGS", repr(args)), tmp_path)) & HEAVY == set()


def eager_commands() -> dict[str, Any]:
    """Every verb's command, built as before lazy registration: each module registered on one Typer."""
    commands = {}
    for module in dict.fromkeys(VERBS.values()):
        verbs = typer.Typer()
        importlib.import_module(f"cgctl.cli.{module}").register(verbs)
        built = typer.main.get_group(verbs).commands
        assert set(built) == {verb for verb, listed in VERBS.items() if listed == module}, (
            f"{module}: not as in VERBS"
        )
        commands |= built
    return commands


def test_help_loads_no_verb_and_nothing_heavy(tmp_path: Path) -> None:
    """`cgctl --help` lists the verbs from cgctl.cli.HELP_GROUPS, in plain text (no rich)."""
    modules = set(probe(RUN.replace("ARGS", repr(["--help"])), tmp_path))
    assert modules & (HEAVY | VERB_MODULES) == set()


def test_a_mistyped_verb_is_matched_against_every_verb(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["cgctl", "images"])
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code == 125
    assert "No such command 'images'. Did you mean 'image'?" in capsys.readouterr().err
