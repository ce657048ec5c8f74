"""`cgctl --help` groups the verbs as docker's help does, one line each, from cgctl.cli.HELP_GROUPS; the
detail stays in each verb's own `--help`. The table is written by hand (so that help imports no verb),
so these tests keep it true to the verbs that exist."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from cgctl.cli import HELP_GROUPS, VERBS, main
from tests.unit.test_cli_startup import eager_commands


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr("sys.argv", ["cgctl", *args])
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code == 0
    return capsys.readouterr().out


def test_every_verb_is_in_exactly_one_group_and_hidden_ones_in_none() -> None:
    listed = Counter(verb for verbs in HELP_GROUPS.values() for verb in verbs)
    assert [verb for verb, times in listed.items() if times > 1] == [], "in more than one group"
    visible = {verb for verb, command in eager_commands().items() if not command.hidden}
    assert visible - set(listed) == set(), "in no group of HELP_GROUPS"
    assert set(listed) - visible == set(), "not a visible verb of VERBS"
    assert set(listed) <= set(VERBS)


def test_help_lists_the_groups_in_order_with_one_line_per_verb(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_cli(["--help"], monkeypatch, capsys)
    headings = re.findall(r"^(\S.*):$", out, re.MULTILINE)
    assert headings == [*HELP_GROUPS, "Options"]
    for group, verbs in HELP_GROUPS.items():
        section = out.split(f"\n{group}:\n", 1)[1].split("\n\n", 1)[0]
        rows = [tuple(re.split(r"\s{2,}", line.strip(), maxsplit=1)) for line in section.splitlines()]
        assert rows == list(verbs.items()), group
    columns = {
        line.index(text)
        for line in out.splitlines()
        for verbs in HELP_GROUPS.values()
        for text in verbs.values()
        if line.endswith(f"  {text}")
    }
    assert len(columns) == 1, "the one-line helps start in one column"
    assert "Run 'cgctl COMMAND --help' for more information on a command." in out
    assert "--host" in out


@pytest.mark.parametrize("verb", ["run", "ps", "image", "policy"])
def test_a_verbs_own_help_is_as_before(
    verb: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rich panels, with the verb's whole first sentence."""
    out = run_cli([verb, "--help"], monkeypatch, capsys)
    assert "╭─ Options" in out
    words = " ".join(out.replace("│", " ").split())
    assert " ".join((eager_commands()[verb].help or "").split(".")[0].split()) in words
