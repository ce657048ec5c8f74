"""Property-based: whatever bytes a policy file holds, loading it returns problems (or policies), never
an exception, a hang or a blown-up memory; and a file that is YAML has every problem at a place in it."""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cgctl.policy.loader import MAX_REPEATED_VALUES, PolicyError, Problem, load, parse
from cgctl.policy.model import PolicyFile

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# PyYAML's line breaks (YAML 1.1): a lone CR, LF, CRLF, NEL, LS and PS.
YAML_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def yaml_lines(text: str) -> int:
    """The lines an editor that breaks where YAML does shows (a final break ends a line, not starts one)."""
    breaks = len(YAML_BREAK.findall(text))
    return max(1, breaks if YAML_BREAK.fullmatch(text[-1:]) else breaks + 1)


def is_yaml(text: str) -> bool:
    try:
        yaml.safe_load(text)  # aliases stay shared here: a bomb is cheap to load, only to walk
    except (yaml.YAMLError, RecursionError):
        return False
    return True


def checked(text: str, name: str = "f.yaml") -> list[Problem]:
    """parse's answer, after the checks that hold for any input."""
    content, problems, _ = parse(name, text)
    assert (content is None) == bool(problems), problems
    if content is not None:
        assert isinstance(content, PolicyFile)
    for problem in problems:
        assert problem.file == name and str(problem).startswith(name)
        assert problem.message
        assert (problem.line == 0) == (problem.column == 0), problem
        assert problem.line >= 0 and problem.column >= 0
    return problems


def placed_in(text: str, problems: list[Problem]) -> None:
    """Every problem of a file that is YAML is at a line and column of it."""
    lines = yaml_lines(text)
    for problem in problems:
        assert 1 <= problem.line <= lines, (problem, lines)
        assert problem.column >= 1, problem


def billion_laughs(levels: int, width: int = 10) -> str:
    lines = ["lol0: &lol0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * width) + "]")
    return "\n".join(lines) + f"\npolicies: *lol{levels - 1}\n"


def merge_bomb(levels: int) -> str:
    lines = ["policies:", "  - name: a", "    match: &m0 {name: x, image: y, user: z, command: w}"]
    for level in range(1, levels):
        aliases = ", ".join(f"*m{level - 1}" for _ in range(10))
        lines.append(f"  - name: a{level}\n    match: &m{level}\n      <<: [{aliases}]")
    return "\n".join(lines) + "\n"


BOMBS = {
    "billion laughs": billion_laughs(9),
    "billion laughs in a field": billion_laughs(9).rpartition("policies:")[0]
    + "policies:\n  - name: a\n    match: {labels: *lol8}\n",
    "wide and shallow": billion_laughs(3, 400),
    "merge keys": merge_bomb(9),
    "an alias to itself": "policies: &p [{name: a, match: {labels: *p}}]\n",
    "a mapping holding itself": "priority_classes: &c {gold: *c}\n",
}
DEEP = {
    "[": "[" * 5000,
    "{": "{" * 5000,
    "{a: ": "{a: " * 5000,
    "- ": "- " * 5000,
    "indented -": "".join("  " * depth + "-\n" for depth in range(2000)),
    "indented a:": "".join(" " * depth + "a:\n" for depth in range(3000)),
    "[] closed": "policies: " + "[" * 5000 + "]" * 5000,
    "nested just under the limit": "policies: " + "[" * 300 + "]" * 300,
    "quotes": "'" * 100_000,
    "anchors": "&a " * 20_000 + "x",
    "tags": "!!str " * 20_000,
}


@pytest.mark.parametrize("text", BOMBS.values(), ids=BOMBS.keys())
def test_alias_bombs_are_refused_quickly_and_small(text: str) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        problems = checked(text)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < 2
    assert peak < 20 << 20, f"{peak >> 20} MiB"
    (problem,) = problems
    assert re.search(f"aliases repeat more than {MAX_REPEATED_VALUES} values|an alias inside its own anchor",
                     problem.message), problem  # fmt: skip
    assert problem.field == "" and problem.line >= 1 and problem.column >= 1
    placed_in(text, problems)


def test_a_file_may_repeat_blocks_up_to_the_bound() -> None:
    block = "{" + ", ".join(f"k{i}: v" for i in range(99)) + "}"  # 99 labels: 199 values with their keys
    policies = "".join(
        f"  - {{name: p{i}, match: {{labels: *l}}}}\n" for i in range(MAX_REPEATED_VALUES // 199)
    )
    text = f"policies:\n  - name: first\n    match: {{labels: &l {block}}}\n{policies}"
    assert checked(text) == []
    assert "aliases repeat more than" in checked(text + "  - {name: last, match: {labels: *l}}\n")[0].message


@pytest.mark.parametrize("text", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_a_problem_not_a_crash(text: str) -> None:
    started = time.monotonic()
    problems = checked(text)
    assert time.monotonic() - started < 5
    assert problems
    if is_yaml(text):
        placed_in(text, problems)


@given(text=st.text(max_size=300))
@example(text="")
@example(text="\ufeffpolicies: []\n")
@example(text="policies:\r\n  - name: a\r\n    bogus: 1\r\n")
@example(text="policies:\n  - name: a\u2028    bogus: 1\n")
@example(text="\x00")
@example(text="policies: !!binary AAAA\n")
@example(text="policies:\n  - !!python/object/apply:os.system [true]\n")
@example(text="%YAML 1.1\n--- {policies: []}\n--- {policies: []}\n")
@example(text="? [a, b]\n: c\n")
@example(text="policies: [{name: a, limits: {memory: {max: .nan}}}]\n")
@example(text="policies:\n  - {name: a, <<: {name: b}}\n")
@example(text="priority_classes: {critical: null}\n")
@FUZZ
def test_any_text_gives_problems_or_policies(text: str) -> None:
    problems = checked(text)
    if is_yaml(text):
        placed_in(text, problems)


@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe" + "policies: []\n".encode("utf-16-le"))
@example(data=b"policies:\n  - name: \xc3\n")
@FUZZ
def test_any_bytes_in_a_file_give_problems_or_policies(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes(data)
    try:
        load([path])
    except PolicyError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.file == str(path) and problem.message
            assert (problem.line == 0) == (problem.column == 0), problem
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            (problem,) = error.problems
            assert problem.message.startswith("not UTF-8 text")
            assert problem.line == data[: decode_error.start].count(b"\n") + 1
        else:
            if is_yaml(text):
                placed_in(text, error.problems)


# Keys a policy file has (and a few it has not), so generated documents get past the first checks.
KEYS = [
    *("policies", "priority_classes", "name", "match", "labels", "image", "user", "command", "priority"),
    *("limits", "actions", "memory", "max", "high", "low", "min", "swap_max", "oom_group", "cpu", "cpus"),
    *("weight", "cpuset", "idle", "io", "device", "rbps", "wbps", "riops", "wiops", "pids", "files", "when"),
    *("do", "pressure", "resource", "kind", "above", "window", "oom_kill", "memory_high", "exit", "set"),
    *("freeze", "thaw", "kill", "restart", "run", "at_most_every", "cpu_weight", "io_weight", "memory_low"),
    *("cpu_idle", "critical", "default", "batch", "idle", "tier", "web", "bogus"),
]
TYPED = (
    "1G 256MiB max 40% 500ms 20s some /bin/true KILL web-* 8:0:100 /dev/vda:wbps=1M critical gold a 0 -1 1.5"
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(TYPED.split())  # what people type, to get past the first checks
    | st.text(max_size=12)
)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
policy = st.dictionaries(st.sampled_from(KEYS[2:]), values, max_size=6).map(
    lambda fields: {"name": "p", **fields}
)
documents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "policies": st.lists(policy | values, max_size=4),
            "priority_classes": st.dictionaries(
                keys, st.dictionaries(st.sampled_from(KEYS), values, max_size=4)
            ),
        },
    ),
    st.dictionaries(keys, values, max_size=4),
    values,
)


def dumped(document: Any, flow: bool | None, width: int) -> str:
    return yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False, width=width)


@given(document=documents, flow=st.sampled_from([None, False, True]), width=st.sampled_from([20, 80, 10_000]))
@FUZZ
def test_generated_documents_give_problems_placed_in_the_file(
    document: Any, flow: bool | None, width: int
) -> None:
    text = dumped(document, flow, width)
    placed_in(text, checked(text))


@given(documents=st.lists(documents, min_size=1, max_size=3), flow=st.sampled_from([None, False, True]))
@FUZZ
def test_generated_sets_of_files_give_problems_placed_in_their_files(
    tmp_path: Path, documents: list[Any], flow: bool | None
) -> None:
    """The set's own checks (unique names, known classes) place their problems too."""
    paths = []
    for index, document in enumerate(documents):
        paths.append(tmp_path / f"{index}.yaml")
        paths[-1].write_text(dumped(document, flow, 80))
    try:
        loaded = load(paths)
    except PolicyError as error:
        texts = {str(path): path.read_text() for path in paths}
        for problem in error.problems:
            placed_in(texts[problem.file], [problem])
    else:
        assert len({located.policy.name for located in loaded.policies}) == len(loaded.policies)
