"""Policy files: every error placed at its file, line, column and field; which policies match a container
and which limit wins; and the runtime's merge and resets that apply the result (no cgroup touched)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cgctl import policy
from cgctl.limits import leaf_name, leaves
from cgctl.policy import EXPLICIT, PolicyError, PolicySet, Problem, Subject, apply_to, blamed, load, resolve
from cgctl.policy.loader import MAX_FILE_BYTES, load_directory, policy_files
from cgctl.policy.model import DEFAULT_CLASSES
from cgctl.policy.resolve import ACTION, Setting
from cgctl.runtime.update import IO_MAX_UNLIMITED, _resets, merge
from cgctl.spec import Limits, SpecError, WorkloadSpec

GiB = 1 << 30
MiB = 1 << 20
# The shape of one problem line: FILE:LINE:COLUMN: field: message
PROBLEM_LINE = re.compile(
    r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<field>[^:\s]+): (?P<message>.+)$"
)

VALID = """\
# web tier: protected, capped
policies:
  - name: web
    match:
      name: "web-*"
      labels: {tier: frontend}
    priority: critical
    limits:
      memory: {max: 1G, high: 768M}
      cpu: {cpus: 1.5}
    actions:
      - when: {pressure: {resource: memory, above: 40%, window: 5s}}
        do: {set: {memory: {high: 1G}}}
        at_most_every: 2m
      - when: oom_kill
        do: restart
  - name: batch-jobs
    match: {labels: {kind: "batch*"}}
    priority: batch
"""


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(*files: Path) -> list[Problem]:
    """Every problem load finds in files (it must find some)."""
    with pytest.raises(PolicyError) as caught:
        load(list(files))
    assert str(caught.value) == "\n".join(map(str, caught.value.problems))
    return caught.value.problems


def only_problem(tmp_path: Path, text: str | bytes, name: str = "p.yaml") -> Problem:
    found = problems(write(tmp_path, name, text))
    assert len(found) == 1, found
    assert found[0].file == str(tmp_path / name)
    return found[0]


def loaded(tmp_path: Path, **files: str) -> PolicySet:
    """The set of files named like keyword arguments: a_yaml -> a.yaml."""
    return load([write(tmp_path, name.replace("_", "."), text) for name, text in files.items()])


def subject(**fields: Any) -> Subject:
    defaults: dict[str, Any] = {
        "name": "web-1",
        "labels": {"tier": "frontend", "team": "shop"},
        "image": "nginx:1.25",
        "user": "alice",
        "command": "nginx",
    }
    return Subject(**{**defaults, **fields})


# --- loading --------------------------------------------------------------------------------------


def test_a_valid_file_loads_with_its_policies_in_order(tmp_path: Path) -> None:
    loaded_set = loaded(tmp_path, web_yaml=VALID)
    assert [(p.policy.name, p.source, p.order) for p in loaded_set.policies] == [
        ("web", "web.yaml:web", 0),
        ("batch-jobs", "web.yaml:batch-jobs", 1),
    ]
    assert loaded_set.files == (str(tmp_path / "web.yaml"),)
    assert loaded_set.classes == DEFAULT_CLASSES
    web = loaded_set.policies[0].policy
    assert web.limits.memory.max == GiB and web.limits.memory.high == 768 * MiB
    pressure, oom = web.actions
    assert pressure.when.kind() == "pressure" and pressure.when.pressure is not None
    assert (pressure.when.pressure.above, pressure.when.pressure.window, pressure.at_most_every) == (
        40,
        5,
        120,
    )
    assert pressure.do.kind() == "set" and pressure.do.set is not None
    assert pressure.do.set.memory.high == GiB
    assert (oom.when.kind(), oom.do.kind()) == ("oom_kill", "restart")


@pytest.mark.parametrize(
    ("text", "line", "column", "field", "message"),
    [
        pytest.param(
            "policies:\n  - name: a\n    limits:\n      memory:\n        max: 12Q\n",
            5,
            14,
            "policies[0].limits.memory.max",
            "'12Q': not a size",
            id="bad size",
        ),
        pytest.param(
            "policies:\n  - name: a\n    limits:\n      io:\n"
            "        max: ['/dev/vda:wbps=1M', '/dev/vdb:foo=1']\n",
            5,
            35,
            "policies[0].limits.io.max[1]",
            "'foo=1' is not one of rbps=",
            id="bad io.max line, second of a flow list",
        ),
        pytest.param(
            "policies:\n  - name: a\n    limts: {}\n",
            3,
            5,
            "policies[0].limts",
            "unknown field 'limts'; allowed here: name, match, priority, limits, actions",
            id="unknown field of a policy",
        ),
        pytest.param(
            "policy: []\n",
            1,
            1,
            "policy",
            "unknown field 'policy'; allowed here: policies, priority_classes",
            id="unknown field at the top",
        ),
        pytest.param(
            "policies:\n  - name: a\n    limits:\n      memory:\n        maxx: 1G\n",
            5,
            9,
            "policies[0].limits.memory.maxx",
            "unknown field 'maxx'; allowed here: max, high, low, min, swap_max, zswap_max, oom_group",
            id="unknown field of the reused Limits",
        ),
        pytest.param(
            "priority_classes:\n  gold:\n    cpu_weigh: 3\n",
            3,
            5,
            "priority_classes.gold.cpu_weigh",
            "unknown field 'cpu_weigh'; allowed here: cpu_weight, io_weight, memory_low, cpu_idle",
            id="unknown field of a priority class",
        ),
        pytest.param(
            "priority_classes:\n  cpu_weight: {bogus: 1}\n",
            2,
            16,
            "priority_classes.cpu_weight.bogus",
            "unknown field 'bogus'; allowed here: cpu_weight, io_weight, memory_low, cpu_idle",
            id="unknown field of a class named like a field",
        ),
        pytest.param(
            "policies:\n  - name: a\n    match: {labels: {'app[0]': [1]}}\n",
            3,
            32,
            "policies[0].match.labels.app[0]",
            "[1]: Input should be a valid string",
            id="a label key with brackets stays in the location",
        ),
        pytest.param(
            "'[': 1\n",
            1,
            1,
            "[",
            "unknown field '['; allowed here: policies, priority_classes",
            id="an unknown key with a bracket at the top (was an IndexError)",
        ),
        pytest.param(
            "policies: [{name: a, 'x[1]': 2}]\n",
            1,
            22,
            "policies[0].x[1]",
            "unknown field 'x[1]'; allowed here: name, match, priority, limits, actions",
            id="an unknown key with brackets (was reported as field 0)",
        ),
        pytest.param(
            "policies:\n  - name: a\n    match:\n      name: x\n      name: y\n",
            5,
            7,
            "policies[0].match.name",
            "given twice in the same mapping",
            id="duplicate key",
        ),
        pytest.param(
            "policies:\n  - name: a\n    match: {name: [x\n",
            4,
            1,
            "",
            "not valid YAML: expected ',' or ']'",
            id="YAML syntax error",
        ),
        pytest.param(
            "policies:\n\t- name: a\n",
            2,
            1,
            "",
            "not valid YAML: found character '\\t'",
            id="a tab for indentation",
        ),
        pytest.param(
            "- name: a\n- name: b\n", 1, 1, "", "expected a mapping with `policies:`", id="a list at the top"
        ),
        pytest.param(
            "just words\n", 1, 1, "", "expected a mapping with `policies:`", id="a scalar at the top"
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n"
            "      - when: {pressure: {resource: io, above: 10, window: 20s}}\n        do: freeze\n",
            4,
            60,
            "policies[0].actions[0].when.pressure.window",
            "'20s': the kernel's pressure triggers take a window of 0.5 s to 10 s",
            id="pressure window too long",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n      - when:\n          pressure:\n"
            "            resource: cpu\n            above: 40%\n            window: 100ms\n"
            "        do: freeze\n",
            8,
            21,
            "policies[0].actions[0].when.pressure.window",
            "'100ms': the kernel's pressure triggers",
            id="pressure window too short",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n      - when: {pressure: {resource: cpu, above: 140%}}\n"
            "        do: freeze\n",
            4,
            49,
            "policies[0].actions[0].when.pressure.above",
            "'140%': a percentage above 0 and at most 100",
            id="pressure above 100%",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n"
            "      - when: oom_kill\n        do: {freeze: true, thaw: true}\n",
            5,
            13,
            "policies[0].actions[0].do",
            "give exactly one action of: set, freeze, thaw, kill, restart, run (got freeze, thaw)",
            id="an action with two kinds",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n"
            "      - when: {oom_kill: true, exit: true}\n        do: kill\n",
            4,
            15,
            "policies[0].actions[0].when",
            "give exactly one event of: pressure, oom_kill, memory_high, exit",
            id="an action with two events",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n"
            "      - when: exit\n        do:\n          run: [notify-send, hi]\n",
            6,
            16,
            "policies[0].actions[0].do.run",
            "the command must be an absolute path",
            id="a relative run path",
        ),
        pytest.param(
            "policies:\n  - name: a\n    actions:\n      - when: exit\n        do: {kill: BOGUS}\n",
            5,
            20,
            "policies[0].actions[0].do.kill",
            "'BOGUS' is not a signal name",
            id="an unknown signal",
        ),
        pytest.param(
            "policies:\n  - name: web server\n",
            2,
            11,
            "policies[0].name",
            "String should match pattern",
            id="a name with a space",
        ),
        pytest.param(
            "policies:\n  - match: {name: x}\n", 2, 5, "policies[0].name", "Field required", id="no name"
        ),
        pytest.param(
            "priority_classes:\n  'two words': {cpu_weight: 5}\n",
            2,
            3,
            "priority_classes",
            "'two words' is not a class name",
            id="a bad class name",
        ),
    ],
)
def test_each_problem_is_placed_at_its_file_line_column_and_field(
    tmp_path: Path, text: str, line: int, column: int, field: str, message: str
) -> None:
    problem = only_problem(tmp_path, text)
    assert (problem.line, problem.column, problem.field) == (line, column, field), problem
    assert message in problem.message
    where = f"{tmp_path / 'p.yaml'}:{line}:{column}: "
    assert str(problem) == where + (f"{field}: " if field else "") + problem.message


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    first = write(
        tmp_path, "a.yaml", "policies:\n  - name: a\n    limits: {memory: {max: lots}, cpu: {weight: 0}}\n"
    )
    second = write(tmp_path, "b.yaml", "policies: [\n")
    found = problems(first, second)
    assert [(p.file, p.line, p.field) for p in found] == [
        (str(first), 3, "policies[0].limits.memory.max"),
        (str(first), 3, "policies[0].limits.cpu.weight"),
        (str(second), 2, ""),
    ]


def test_an_unknown_priority_class_lists_the_known_ones(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "policies:\n  - name: a\n    priority: gold\n")
    assert (problem.line, problem.column, problem.field) == (3, 15, "policies[0].priority")
    assert problem.message == (
        "'gold' is not a priority class: use one of batch, critical, default, idle or define it "
        "under priority_classes"
    )


def test_a_class_defined_in_another_file_is_known(tmp_path: Path) -> None:
    classes = write(tmp_path, "00-classes.yaml", "priority_classes:\n  gold: {cpu_weight: 800}\n")
    user = write(tmp_path, "10-web.yaml", "policies:\n  - {name: web, priority: gold}\n")
    assert load([classes, user]).classes["gold"].cpu_weight == 800
    assert "'gold' is not a priority class" in problems(user)[0].message


def test_duplicate_policy_names_across_files_name_both(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "policies:\n  - name: web\n  - name: db\n")
    second = write(tmp_path, "b.yaml", "# the same name\npolicies:\n  - name: other\n  - name: web\n")
    (problem,) = problems(first, second)
    assert (problem.file, problem.line, problem.column, problem.field) == (
        str(second),
        4,
        11,
        "policies[1].name",
    )
    assert problem.message == f"'web' is also the name of a policy in {first}: names must be unique"


def test_duplicate_policy_names_in_one_file(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "policies:\n  - name: web\n  - name: web\n")
    assert (problem.line, problem.column, problem.field) == (3, 11, "policies[1].name")
    assert "also the name of a policy in" in problem.message


def test_a_file_larger_than_a_mebibyte_is_refused_unparsed(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "# " + "x" * MAX_FILE_BYTES + "\npolicies: []\n")
    assert (problem.line, problem.column, problem.field) == (0, 0, "")
    assert problem.message == "cannot read it: larger than 1024 KiB: not a policy file"
    assert str(problem) == f"{tmp_path / 'p.yaml'}: {problem.message}"
    just_fits = "policies: []\n#" + "x" * (MAX_FILE_BYTES - 15) + "\n"
    assert len(just_fits.encode()) == MAX_FILE_BYTES
    assert load([write(tmp_path, "q.yaml", just_fits)]).policies == ()


def test_a_file_that_is_not_utf8_is_refused_where_the_bad_byte_is(tmp_path: Path) -> None:
    """Decoded with replacement, the byte would slip into a glob or a comment unseen."""
    problem = only_problem(
        tmp_path, "policies:\n  - name: a\n    match: {name: 'caf\xe9-*'}\n".encode("latin-1")
    )
    assert (problem.line, problem.column, problem.field) == (3, 23, "")
    assert problem.message == "not UTF-8 text (byte 0xe9): save it as UTF-8"
    in_a_comment = only_problem(tmp_path, b"# \xff\xfe\npolicies: []\n", "q.yaml")
    assert (in_a_comment.line, in_a_comment.column) == (1, 3)
    multibyte_before = only_problem(tmp_path, "# é ü\n".encode() + b"  x\x80\n", "r.yaml")
    assert (multibyte_before.line, multibyte_before.column) == (2, 4)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing yet\n", "---\n", "policies: []\n", "{}\n"])
def test_an_empty_file_has_no_policies(tmp_path: Path, text: str) -> None:
    loaded_set = loaded(tmp_path, empty_yaml=text)
    assert loaded_set.policies == () and loaded_set.classes == DEFAULT_CLASSES


def test_priority_classes_override_a_default_and_add_one_a_policy_uses(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="priority_classes:\n  batch: {cpu_weight: 10}\n  gold: {cpu_weight: 800, memory_low: 2G}\n"
        "policies:\n  - {name: jobs, priority: batch}\n  - {name: shop, priority: gold}\n",
    )
    assert loaded_set.classes["batch"].cpu_weight == 10 and loaded_set.classes["batch"].io_weight is None
    assert loaded_set.classes["critical"] == DEFAULT_CLASSES["critical"]
    assert DEFAULT_CLASSES["batch"].cpu_weight == 25  # the defaults themselves are untouched
    jobs = resolve(loaded_set, subject(), {})
    assert jobs.limits.cpu.weight == 800 and jobs.limits.memory.low == 2 * GiB  # shop is later: it wins
    assert jobs.winners[("cpu", "weight")].source == "a.yaml:shop (priority gold)"
    assert jobs.overridden[("cpu", "weight")][0].source == "a.yaml:jobs (priority batch)"
    assert jobs.overridden[("cpu", "weight")][0].value == 10


def test_a_later_file_overrides_a_class_of_an_earlier_one(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="priority_classes:\n  gold: {cpu_weight: 800}\n",
        b_yaml="priority_classes:\n  gold: {cpu_weight: 900}\n",
    )
    assert loaded_set.classes["gold"].cpu_weight == 900


def test_anchors_and_merge_keys_share_blocks_between_policies(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n"
        "  - name: small\n    limits: &small {memory: {max: 256M}, pids: {max: 100}}\n"
        "  - name: also-small\n    match: {name: 'x-*'}\n    limits: *small\n"
        "  - name: small-plus\n    limits:\n      <<: *small\n      cpu: {weight: 50}\n",
    )
    small, also, plus = (located.policy for located in loaded_set.policies)
    assert small.limits == also.limits
    assert plus.limits.memory.max == 256 * MiB and plus.limits.cpu.weight == 50


def test_policy_files_orders_by_name_and_skips_dotfiles_and_other_suffixes(tmp_path: Path) -> None:
    for name in ["20-b.yml", "10-a.yaml", ".hidden.yaml", "notes.txt", "30-c.yaml~", "c.yaml.swp", "05.yaml"]:
        write(tmp_path, name, "policies: []\n")
    named = write(tmp_path.parent, f"{tmp_path.name}-given.conf", "policies: []\n")
    assert policy_files([tmp_path, named]) == [
        tmp_path / "05.yaml",
        tmp_path / "10-a.yaml",
        tmp_path / "20-b.yml",
        named,  # a file named is taken whatever its name
    ]


def test_load_directory_reads_it_in_order_and_a_missing_one_is_empty(tmp_path: Path) -> None:
    assert load_directory(tmp_path / "nowhere") == PolicySet()
    write(tmp_path, "b.yaml", "policies:\n  - name: second\n")
    write(tmp_path, "a.yaml", "policies:\n  - name: first\n")
    write(tmp_path, ".draft.yaml", "this: is: not: yaml\n")
    assert [located.source for located in load_directory(tmp_path).policies] == [
        "a.yaml:first",
        "b.yaml:second",
    ]


def test_an_unreadable_path_is_a_problem_of_the_file_as_a_whole(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    (problem,) = problems(tmp_path / "dir.yaml")
    assert (problem.line, problem.column) == (0, 0) and problem.message.startswith("cannot read it: ")


def test_the_default_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CGCTL_POLICY_DIR", str(tmp_path))
    assert policy.default_directory() == tmp_path
    monkeypatch.delenv("CGCTL_POLICY_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert policy.default_directory() == tmp_path / "config/cgctl/policies.d"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert policy.default_directory() == Path("/etc/cgctl/policies.d")


# --- resolving ------------------------------------------------------------------------------------


def test_the_more_specific_policy_wins_whatever_the_file_order(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n  - name: web\n    match: {name: 'web-*', labels: {tier: frontend}}\n"
        "    limits: {memory: {max: 1G}}\n",
        b_yaml="policies:\n  - name: everyone\n    limits: {memory: {max: 4G, high: 3G}}\n"
        "  - name: shop\n    match: {labels: {team: shop}}\n    limits: {memory: {max: 2G}}\n",
    )
    resolution = resolve(loaded_set, subject(), {})
    assert resolution.limits.memory.max == GiB and resolution.limits.memory.high == 3 * GiB
    assert resolution.winners[("memory", "max")].source == "a.yaml:web"
    assert [(s.source, s.value) for s in resolution.overridden[("memory", "max")]] == [
        ("b.yaml:shop", 2 * GiB),
        ("b.yaml:everyone", 4 * GiB),
    ]
    assert resolution.names == ["everyone", "shop", "web"]  # lowest precedence first
    assert ("memory", "high") not in resolution.overridden


def test_ties_go_to_the_later_file_then_the_later_policy(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n"
        "  - {name: a1, match: {user: alice}, limits: {pids: {max: 10}, cpu: {weight: 1}}}\n"
        "  - {name: a2, match: {command: nginx}, limits: {pids: {max: 20}}}\n",
        b_yaml="policies:\n  - {name: b1, match: {image: nginx}, limits: {cpu: {weight: 2}}}\n",
    )
    resolution = resolve(loaded_set, subject(), {})
    assert resolution.winners[("pids", "max")] == Setting(20, "a.yaml:a2")
    assert resolution.winners[("cpu", "weight")] == Setting(2, "b.yaml:b1")
    assert [s.source for s in resolution.overridden[("pids", "max")]] == ["a.yaml:a1"]
    assert [s.source for s in resolution.overridden[("cpu", "weight")]] == ["a.yaml:a1"]


def test_a_policys_priority_class_is_under_its_own_limits_but_over_less_specific_policies(
    tmp_path: Path,
) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n"
        "  - name: web\n    match: {name: 'web-*'}\n    priority: critical\n"
        "    limits: {cpu: {weight: 300}}\n"
        "  - name: everyone\n    limits: {cpu: {weight: 50, idle: true}, memory: {low: 1M}}\n",
    )
    resolution = resolve(loaded_set, subject(), {})
    assert resolution.limits.cpu.weight == 300 and resolution.limits.memory.low == "max"
    assert resolution.limits.cpu.idle is True  # critical does not say: the generic policy's stays
    assert [(s.source, s.value) for s in resolution.overridden[("cpu", "weight")]] == [
        ("a.yaml:web (priority critical)", 400),
        ("a.yaml:everyone", 50),
    ]
    assert resolution.winners[("memory", "low")].source == "a.yaml:web (priority critical)"
    assert resolution.winners[("io", "weight", "default")] == Setting(
        {"device": None, "weight": 400}, "a.yaml:web (priority critical)"
    )
    assert [w.weight for w in resolution.limits.io.weight] == [400]


def test_explicit_limits_beat_policies_and_action_limits_beat_everything(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n  - {name: all, limits: {memory: {max: 4G}, pids: {max: 64}}}\n"
        "  - {name: web, match: {name: 'web-*'}, limits: {memory: {max: 2G}}}\n",
    )
    explicit = {"memory": {"max": GiB}, "cpu": {"weight": 10}}
    actions = {"memory": {"max": 3 * GiB}}
    resolution = resolve(loaded_set, subject(), explicit, actions)
    assert resolution.limits.memory.max == 3 * GiB
    assert resolution.limits.cpu.weight == 10 and resolution.limits.pids.max == 64
    assert [(s.source, s.value) for s in resolution.overridden[("memory", "max")]] == [
        (EXPLICIT, GiB),
        ("a.yaml:web", 2 * GiB),
        ("a.yaml:all", 4 * GiB),
    ]
    assert resolution.winners[("memory", "max")].source == ACTION
    without_actions = resolve(loaded_set, subject(), explicit)
    assert without_actions.limits.memory.max == GiB
    assert without_actions.winners[("memory", "max")].source == EXPLICIT


def test_a_policy_sets_only_the_limits_it_gives(tmp_path: Path) -> None:
    """Defaults of the model (oom_group true, idle false) are not the policy's to impose."""
    loaded_set = loaded(tmp_path, a_yaml="policies:\n  - {name: a, limits: {memory: {oom_group: false}}}\n")
    resolution = resolve(loaded_set, subject(), {"memory": {"max": GiB}})
    assert set(resolution.winners) == {("memory", "oom_group"), ("memory", "max")}
    assert resolution.limits.memory.oom_group is False and resolution.limits.cpu.idle is False


def test_no_policy_leaves_the_explicit_limits_as_they_are() -> None:
    explicit = {"memory": {"max": GiB}, "io": {"max": [{"device": "/dev/vda", "wbps": MiB}]}}
    resolution = resolve(PolicySet(), subject(), explicit)
    assert resolution.limits == Limits.model_validate(explicit)
    assert resolution.policies == [] and resolution.overridden == {}
    assert resolution.record() == {"applied": [], "sources": {}}


@pytest.mark.parametrize(
    ("match", "fields", "matched"),
    [
        ("{}", {}, True),
        ("{name: 'web-*'}", {}, True),
        ("{name: 'web-*'}", {"name": "db-1"}, False),
        ("{name: 'web-?'}", {"name": "web-10"}, False),
        ("{name: 'web-*'}", {"name": "WEB-1"}, False),  # case matters
        ("{labels: {tier: 'front*'}}", {}, True),
        ("{labels: {tier: 'front*', team: shop}}", {}, True),
        ("{labels: {tier: 'front*', team: ads}}", {}, False),  # every label must match
        ("{labels: {owner: '*'}}", {}, False),  # a label it does not have
        ("{labels: {owner: '*'}}", {"labels": {"owner": ""}}, True),
        ("{image: nginx}", {}, True),  # NAME matches NAME:TAG
        ("{image: 'ngin*'}", {}, True),
        ("{image: 'nginx:1.*'}", {}, True),
        ("{image: 'nginx:1.*'}", {"image": "nginx:2.0"}, False),
        ("{image: 'nginx:*'}", {"image": "nginx"}, False),
        ("{image: nginx}", {"image": "nginx"}, True),  # an image recorded without a tag
        ("{image: 'team/*'}", {"image": "team/app:1.2"}, True),
        ("{image: nginx}", {"image": "nginx-extra:1"}, False),
        ("{image: '*'}", {"image": ""}, False),  # no image: an image condition cannot hold
        ("{user: alice}", {}, True),
        ("{user: 'ali*'}", {}, False),  # the user is not a glob
        ("{user: '1000'}", {"user": "1000"}, True),
        ("{command: nginx}", {}, True),
        ("{command: 'ngin?'}", {}, True),
        ("{command: 'python*'}", {}, False),
        ("{name: 'web-*', labels: {tier: frontend}, image: nginx, user: alice, command: nginx}", {}, True),
        ("{name: 'web-*', labels: {tier: frontend}, image: nginx, user: bob, command: nginx}", {}, False),
    ],
)
def test_match_conditions(tmp_path: Path, match: str, fields: dict[str, Any], matched: bool) -> None:
    loaded_set = loaded(tmp_path, m_yaml=f"policies:\n  - name: m\n    match: {match}\n")
    assert policy.matches(loaded_set.policies[0], subject(**fields)) is matched


def test_a_subject_from_a_spec() -> None:
    spec = {
        "command": ["/usr/sbin/nginx", "-g", "daemon off;"],
        "user": "1000:1000",
        "labels": {"tier": "frontend"},
        "rootfs": {"layers": ["/l"], "image": "nginx:1.25"},
    }
    assert Subject.of(spec, "web-1") == Subject("web-1", {"tier": "frontend"}, "nginx:1.25", "1000", "nginx")
    bare = Subject.of({"command": ["true"]}, "x")
    assert (bare.image, bare.labels, bare.command) == ("", {}, "true")
    assert bare.user  # the caller, by name (or id)


def test_io_limits_combine_per_device_across_policies(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n"
        "  - name: disks\n    priority: batch\n    limits:\n      io:\n"
        "        max: ['/dev/vda:wbps=10M', '/dev/vdb:riops=100']\n        weight: ['8:16:300']\n"
        "  - name: web\n    match: {name: 'web-*'}\n    limits:\n      io:\n"
        "        max: [{device: /dev/vda, rbps: 5M}]\n        weight: [50]\n",
    )
    resolution = resolve(loaded_set, subject(), {"io": {"max": [{"device": "/dev/vdc", "wiops": 7}]}})
    by_device = {cap.device: cap for cap in resolution.limits.io.max}
    assert set(by_device) == {"/dev/vda", "/dev/vdb", "/dev/vdc"}
    assert (by_device["/dev/vda"].rbps, by_device["/dev/vda"].wbps) == (5 * MiB, None)  # one leaf: replaced
    assert by_device["/dev/vdb"].riops == 100 and by_device["/dev/vdc"].wiops == 7
    assert {(w.device, w.weight) for w in resolution.limits.io.weight} == {(None, 50), ("8:16", 300)}
    assert [s.source for s in resolution.overridden[("io", "weight", "default")]] == [
        "a.yaml:disks (priority batch)"
    ]
    assert resolution.record()["sources"] == {
        "io.max[/dev/vda]": "a.yaml:web",
        "io.max[/dev/vdb]": "a.yaml:disks",
        "io.weight[default]": "a.yaml:web",
        "io.weight[8:16]": "a.yaml:disks",
        "cpu.weight": "a.yaml:disks (priority batch)",
    }


def test_leaves_and_their_names() -> None:
    fields = Limits.model_validate(
        {"memory": {"max": "1G"}, "io": {"max": ["/dev/vda:wbps=1M"], "weight": ["100"]},
         "files": {"memory.swap.high": "1G"}}
    ).model_dump(mode="json", exclude_unset=True)  # fmt: skip
    assert sorted(map(leaf_name, leaves(fields))) == [
        "files[memory.swap.high]",
        "io.max[/dev/vda]",
        "io.weight[default]",
        "memory.max",
    ]


def test_the_record_keeps_applied_policies_and_the_sources_policies_won(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n"
        "  - {name: all, priority: idle, limits: {pids: {max: 50}, files: {memory.swap.high: 1M}}}\n"
        "  - {name: other, match: {name: 'db-*'}, limits: {pids: {max: 1}}}\n",
        b_yaml="policies:\n  - {name: web, match: {name: 'web-*'}, limits: {memory: {max: 1G}}}\n",
    )
    resolution = resolve(loaded_set, subject(), {"memory": {"max": 2 * GiB}}, {"cpu": {"weight": 5}})
    assert resolution.record() == {
        "applied": ["a.yaml:all", "b.yaml:web"],
        "sources": {
            "cpu.idle": "a.yaml:all (priority idle)",
            "io.weight[default]": "a.yaml:all (priority idle)",
            "pids.max": "a.yaml:all",
            "files[memory.swap.high]": "a.yaml:all",
        },  # memory.max is explicit, cpu.weight an action's: neither is a policy's
    }
    json.dumps(resolution.record())  # a run record is JSON


# --- applying to a spec ---------------------------------------------------------------------------


def test_apply_to_puts_the_policies_under_the_spec_and_notes_what_was_explicit(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="policies:\n  - name: web\n    match: {name: 'web-*', command: sleep}\n"
        "    limits: {memory: {max: 2G}, cpu: {weight: 50}, io: {max: ['/dev/vda:wbps=1M']}}\n",
    )
    spec = WorkloadSpec.model_validate(
        {"command": ["/bin/sleep", "1"], "limits": {"memory": {"max": "1G"}}, "labels": {"a": "b"}}
    )
    effective, noted = apply_to(spec, "web-1", loaded_set)
    assert effective.limits.memory.max == GiB and effective.limits.cpu.weight == 50
    assert [cap.device for cap in effective.limits.io.max] == ["/dev/vda"]
    assert effective.model_dump(exclude={"limits"}) == spec.model_dump(exclude={"limits"})
    assert noted == {
        "explicit": {"memory": {"max": GiB}},
        "policy": {
            "applied": ["a.yaml:web"],
            "sources": {"cpu.weight": "a.yaml:web", "io.max[/dev/vda]": "a.yaml:web"},
        },
    }
    assert spec.limits.cpu.weight is None  # the spec given is not changed
    _, unmatched = apply_to(spec, "db-1", loaded_set)
    assert unmatched["policy"] == {"applied": [], "sources": {}}


NOTED = {
    "explicit": {"memory": {"max": GiB}},
    "policy": {
        "applied": ["a.yaml:pin"],
        "sources": {
            "cpu.cpuset": "a.yaml:pin",
            "io.max[/dev/nvme9n1]": "a.yaml:disk",
            "io.weight[/dev/sdz]": "a.yaml:disk",
            "files[memory.swap.high]": "a.yaml:swap",
        },
    },
}


@pytest.mark.parametrize(
    ("error", "source", "limit"),
    [
        (SpecError(("limits", "cpu", "cpuset"), "0-63", "CPU(s) 8-63 are not available"), "a.yaml:pin",
         "cpu.cpuset"),
        (SpecError(("limits", "io", "max", 0), "/dev/nvme9n1", "cannot use the device: No such file"),
         "a.yaml:disk", "io.max[/dev/nvme9n1]"),
        (SpecError(("limits", "io", "weight", 1), "/dev/sdz", "a per-device io.weight needs io.cost"),
         "a.yaml:disk", "io.weight[/dev/sdz]"),
        (SpecError(("limits", "files", "memory.swap.high"), "memory.swap.high=1G", "no such file"),
         "a.yaml:swap", "files[memory.swap.high]"),
    ],
)  # fmt: skip
def test_blamed_names_the_policy_that_set_a_refused_limit(error: SpecError, source: str, limit: str) -> None:
    with pytest.raises(SpecError) as caught, blamed(NOTED):
        raise error
    assert caught.value is not error
    assert caught.value.field == (f"policy {source}",) and caught.value.value == error.value
    assert caught.value.reason == f"{limit}: {error.reason}"
    assert str(caught.value).startswith(f"policy {source}=")


@pytest.mark.parametrize(
    "error",
    [
        SpecError(("limits", "memory", "max"), GiB, "explicit: the user's own option"),
        SpecError(("limits", "io", "max", 0), "/dev/vda", "a device no policy set"),
        SpecError(("limits", "files", "cpu.uclamp.min"), "cpu.uclamp.min=1", "not a policy's"),
        SpecError(("rootfs", "upper"), "/nowhere", "not a limit at all"),
        SpecError(("limits",), "?", "no leaf"),
    ],
)
def test_blamed_leaves_an_error_no_policy_caused_as_it_is(error: SpecError) -> None:
    with pytest.raises(SpecError) as caught, blamed(NOTED):
        raise error
    assert caught.value is error


def test_blamed_lets_everything_else_through() -> None:
    with blamed(NOTED):
        pass
    with pytest.raises(KeyError), blamed(NOTED):
        raise KeyError("not a SpecError")


# --- the runtime's merge and resets ---------------------------------------------------------------


def test_merge_takes_partial_limits_and_keeps_what_the_changes_do_not_give() -> None:
    old = {"memory": {"max": GiB, "high": 512 * MiB}, "pids": {"max": 10}}
    merged = merge(old, {"memory": {"max": 2 * GiB}, "cpu": {"weight": 50}})
    assert merged == {
        "memory": {"max": 2 * GiB, "high": 512 * MiB},
        "pids": {"max": 10},
        "cpu": {"weight": 50},
    }
    assert old == {"memory": {"max": GiB, "high": 512 * MiB}, "pids": {"max": 10}}  # not changed in place
    assert merge({}, {}) == {} and merge({}, {"pids": {"max": 5}}) == {"pids": {"max": 5}}
    assert merge(old, {}) == old
    full = Limits().model_dump(mode="json")
    assert Limits.model_validate(merge(full, {"memory": {"swap_max": "max"}})).memory.swap_max == "max"


def test_merge_of_io_replaces_only_the_devices_given() -> None:
    old: dict[str, Any] = {
        "io": {
            "max": [{"device": "/dev/vda", "wbps": MiB}, {"device": "/dev/vdb", "rbps": MiB}],
            "weight": [{"device": None, "weight": 100}, {"device": "8:16", "weight": 200}],
        }
    }
    merged = merge(old, {"io": {"max": ["/dev/vda:riops=100"], "weight": ["50"]}})
    limits = Limits.model_validate(merged)
    assert [(cap.device, cap.wbps, cap.rbps, cap.riops) for cap in limits.io.max] == [
        ("/dev/vdb", None, MiB, None),
        ("/dev/vda", None, None, 100),  # the device's whole line is the change's
    ]
    assert [(w.device, w.weight) for w in limits.io.weight] == [("8:16", 200), (None, 50)]
    assert len(old["io"]["max"]) == 2 and old["io"]["weight"][0]["weight"] == 100
    from_nothing = Limits.model_validate(merge({"memory": {"max": 1}}, {"io": {"weight": ["8:0:10"]}}))
    assert [(w.device, w.weight) for w in from_nothing.io.weight] == [("8:0", 10)]
    assert from_nothing.memory.max == 1


@pytest.mark.parametrize(
    ("before", "after", "resets"),
    [
        ([("memory.max", "1073741824")], [], [("memory.max", "max")]),
        ([("memory.low", "1024"), ("memory.min", "1")], [], [("memory.low", "0"), ("memory.min", "0")]),
        ([("cpu.max", "50000 100000")], [], [("cpu.max", "max 100000")]),
        ([("cpu.weight", "400")], [], [("cpu.weight", "100")]),
        ([("cpu.idle", "1")], [], [("cpu.idle", "0")]),
        ([("pids.max", "10")], [], [("pids.max", "max")]),
        ([("io.max", "8:0 wbps=1048576")], [], [("io.max", f"8:0 {IO_MAX_UNLIMITED}")]),
        ([("io.max", "8:0 wbps=1"), ("io.max", "8:16 rbps=2")], [("io.max", "8:16 rbps=3")],
         [("io.max", "8:0 rbps=max wbps=max riops=max wiops=max")]),
        ([("io.weight", "default 400")], [], [("io.weight", "default 100")]),
        ([("io.weight", "8:16 300")], [], [("io.weight", "8:16 default")]),
        ([("memory.swap.high", "1G")], [], []),  # a --cgroup-set file: no known default
        ([("memory.max", "1")], [("memory.max", "2")], []),  # still set: written, not reset
        ([("memory.max", "1"), ("pids.max", "5")], [("pids.max", "5")], [("memory.max", "max")]),
        ([], [("memory.max", "1")], []),
    ],
)  # fmt: skip
def test_resets_put_limits_no_longer_given_back_to_the_kernels_defaults(
    before: list[tuple[str, str]], after: list[tuple[str, str]], resets: list[tuple[str, str]]
) -> None:
    assert _resets(before, after) == resets


# --- cgctl policy validate ------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    """One cgctl command in a process of its own, as a user types it: (status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cgctl", *args], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_validate_says_valid_files_are_valid(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", VALID)
    write(tmp_path, "b.yml", "policies:\n  - name: solo\n")
    status, out, err = cli("policy", "validate", str(tmp_path))
    assert (status, out, err) == (0, "2 file(s), 3 policies: valid\n", "")
    status, out, _ = cli("policy", "validate", str(tmp_path / "b.yml"))
    assert (status, out) == (0, "1 file(s), 1 policy: valid\n")


def test_validate_prints_every_problem_at_its_place_and_exits_1(tmp_path: Path) -> None:
    first = write(
        tmp_path, "a.yaml", "policies:\n  - name: a\n    limits: {memory: {max: 12Q}}\n    prio: 1\n"
    )
    second = write(
        tmp_path, "b.yaml", "policies:\n  - name: b\n    actions:\n      - {when: exit, do: {run: [x]}}\n"
    )
    third = write(tmp_path, "c.yaml", "policies:\n  - name: c\n")
    fourth = write(tmp_path, "d.yaml", "policies:\n  - name: c\n    priority: gold\n")
    status, out, err = cli("policy", "validate", str(tmp_path))
    assert status == 1 and out == ""
    lines = err.splitlines()
    found = [PROBLEM_LINE.match(line) for line in lines]
    assert all(found), lines
    assert [(m["file"], int(m["line"]), int(m["column"]), m["field"]) for m in found if m] == [
        (str(first), 3, 28, "policies[0].limits.memory.max"),
        (str(first), 4, 5, "policies[0].prio"),
        (str(second), 4, 32, "policies[0].actions[0].do.run"),
        # the set's checks come after each file's own, over the files that parsed
        (str(fourth), 2, 11, "policies[0].name"),
        (str(fourth), 3, 15, "policies[0].priority"),
    ]
    assert lines[3].endswith(f"'c' is also the name of a policy in {third}: names must be unique")


def test_validate_as_json(tmp_path: Path) -> None:
    good = write(tmp_path, "a.yaml", VALID)
    status, out, _ = cli("policy", "validate", "--json", str(good))
    assert status == 0
    assert json.loads(out) == {
        "files": [str(good)],
        "problems": [],
        "policies": ["a.yaml:web", "a.yaml:batch-jobs"],
    }
    bad = write(tmp_path, "b.yaml", "policies:\n  - {name: x, priority: gold}\n")
    status, out, err = cli("policy", "validate", "--json", str(good), str(bad))
    assert status == 1 and err == ""
    answer = json.loads(out)
    assert answer["files"] == [str(good), str(bad)] and answer["policies"] == []
    assert [PROBLEM_LINE.match(p)["field"] for p in answer["problems"]] == ["policies[0].priority"]  # type: ignore[index]


def test_validate_of_a_missing_path_fails_and_still_checks_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write(tmp_path, "a.yaml", "policies: 3\n")
    status, out, err = cli("policy", "validate", str(tmp_path / "gone.yaml"), str(bad))
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"{tmp_path / 'gone.yaml'}: no such file or directory",
        f"{bad}:1:11: policies: 3: Input should be a valid list",
    ]
    monkeypatch.setenv("CGCTL_POLICY_DIR", str(tmp_path / "policies.d"))
    status, _, err = cli("policy", "validate")
    assert status == 1 and err == f"{tmp_path / 'policies.d'}: no such file or directory\n"
    (tmp_path / "policies.d").mkdir()
    assert cli("policy", "validate") == (0, "0 file(s), 0 policies: valid\n", "")


def test_bandwidth_from_policies_and_classes_reaches_only_containers_with_a_network(tmp_path: Path) -> None:
    loaded_set = loaded(
        tmp_path,
        a_yaml="priority_classes:\n  slow: {cpu_weight: 10, egress_bandwidth: 5mbit}\n"
        "policies:\n  - {name: jobs, priority: slow, limits: {network: {ingress: 20M}}}\n",
    )
    networked = resolve(loaded_set, subject(), {})
    assert (networked.limits.network.egress, networked.limits.network.ingress) == (5_000_000, 20_000_000)
    assert networked.winners[("network", "egress")].source == "a.yaml:jobs (priority slow)"
    assert networked.record()["sources"]["network.ingress"] == "a.yaml:jobs"
    alone = resolve(loaded_set, subject(networked=False), {"network": {"egress": 1000}})
    assert alone.limits.network.ingress is None and alone.limits.cpu.weight == 10
    assert alone.limits.network.egress == 1000  # explicit: kept, for the run or update to refuse by name
    for mode, expected in [
        ("none", False),
        ("host", False),
        ("container:db", False),
        ("bridge", True),
        (None, True),
    ]:
        assert Subject.of({"command": ["true"], "network": {"mode": mode}}, "x").networked is expected


def test_a_bad_rate_in_a_class_is_placed_at_its_line(tmp_path: Path) -> None:
    found = only_problem(tmp_path, "priority_classes:\n  slow: {egress_bandwidth: 5 apples}\n")
    assert (found.line, found.field) == (2, "priority_classes.slow.egress_bandwidth")
    assert "not a rate" in found.message
