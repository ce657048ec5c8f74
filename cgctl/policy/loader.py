"""Reading policy files: YAML with every error placed at its file:line:column, and the whole
directory checked as one set (names unique, classes known) before any of it is used."""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cgctl.limits import Leaf, leaves
from cgctl.policy.model import DEFAULT_CLASSES, Policy, PolicyFile, PriorityClass

SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 1 << 20
# Values that aliases may repeat in a file: plenty for shared blocks (`<<: *base`), and the end of
# an alias bomb (nine levels of ten aliases stand for 10**9 values in a few hundred bytes).
MAX_REPEATED_VALUES = 100_000
Path_ = tuple[str | int, ...]


def default_directory() -> Path:
    """$CGCTL_POLICY_DIR, else /etc/cgctl/policies.d as root and ~/.config/cgctl/policies.d rootless."""
    if os.environ.get("CGCTL_POLICY_DIR"):
        return Path(os.environ["CGCTL_POLICY_DIR"])
    if os.geteuid() == 0:
        return Path("/etc/cgctl/policies.d")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "cgctl/policies.d"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One error, where it is and what is allowed instead."""

    file: str
    line: int  # 1-based; 0 when the error concerns the file as a whole
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class PolicyError(ValueError):
    """Policy files that cannot be used; `problems` has every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Located:
    """A policy and where it was written (for explain and events)."""

    policy: Policy
    file: str
    order: int  # position in the whole set: files by name, then policies in their file

    @property
    def source(self) -> str:
        return f"{Path(self.file).name}:{self.policy.name}"

    @functools.cached_property
    def limits(self) -> dict[Leaf, Any]:
        """The limits it gives, as leaves: flattened once, read by every resolution."""
        return leaves(self.policy.limits.model_dump(mode="json", exclude_unset=True))


@dataclasses.dataclass(frozen=True)
class PolicySet:
    policies: tuple[Located, ...] = ()
    classes: dict[str, PriorityClass] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CLASSES))
    files: tuple[str, ...] = ()


def policy_files(paths: Iterable[Path]) -> list[Path]:
    """The YAML files named, and those directly in the directories named, each directory by name."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
        else:
            found.append(path)
    return found


def load_directory(directory: Path, must_exist: bool = False) -> PolicySet:
    """The directory's policies (none if it does not exist, unless it must); PolicyError if any file
    is bad."""
    try:
        exists = directory.is_dir()
    except PermissionError:  # a default under someone else's home (HOME=/root for another user)
        if must_exist:
            raise PolicyError(
                [Problem(str(directory), 0, 0, "", "cannot read it: permission denied")]
            ) from None
        return PolicySet()
    if not exists:
        if must_exist:
            raise PolicyError([Problem(str(directory), 0, 0, "", "no such directory")])
        return PolicySet()
    return load(policy_files([directory]))


def load(files: list[Path]) -> PolicySet:
    """Every file parsed and checked, then the set as a whole; PolicyError lists all problems."""
    problems: list[Problem] = []
    parsed: list[tuple[str, PolicyFile, dict[Path_, tuple[int, int]]]] = []
    for path in files:
        try:
            text = _read(path)
        except OSError as error:
            problems.append(Problem(str(path), 0, 0, "", f"cannot read it: {error.strerror or error}"))
            continue
        except UnicodeDecodeError as error:
            problems.append(_not_utf8(str(path), error))
            continue
        content, file_problems, marks = parse(str(path), text)
        problems += file_problems
        if content is not None:
            parsed.append((str(path), content, marks))
    classes = dict(DEFAULT_CLASSES)
    for _, content, _ in parsed:
        classes.update(content.priority_classes)
    located: list[Located] = []
    seen: dict[str, str] = {}
    for file, content, marks in parsed:
        for index, policy in enumerate(content.policies):
            line, column = marks.get(("policies", index, "name"), (0, 0))
            if policy.name in seen:
                also = f"{policy.name!r} is also the name of a policy in {seen[policy.name]}"
                problems.append(
                    Problem(file, line, column, f"policies[{index}].name", f"{also}: names must be unique")
                )
            seen[policy.name] = file
            if policy.priority is not None and policy.priority not in classes:
                line, column = marks.get(("policies", index, "priority"), (line, column))
                known = ", ".join(sorted(classes))
                reason = f"{policy.priority!r} is not a priority class: use one of {known} or define it"
                problems.append(
                    Problem(
                        file, line, column, f"policies[{index}].priority", f"{reason} under priority_classes"
                    )
                )
            located.append(Located(policy, file, len(located)))
    if problems:
        raise PolicyError(problems)
    return PolicySet(tuple(located), classes, tuple(str(path) for path in files))


def _read(path: Path) -> str:
    with path.open("rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"larger than {MAX_FILE_BYTES >> 10} KiB: not a policy file")
    return data.decode("utf-8")


def _not_utf8(file: str, error: UnicodeDecodeError) -> Problem:
    """Where the first byte that is not UTF-8 is: decoded as U+FFFD it would pass unseen in a glob or
    a comment, and the file would not say what its author meant."""
    before = error.object[: error.start]
    line_start = before.rfind(b"\n") + 1
    column = len(before[line_start:].decode("utf-8")) + 1
    byte = error.object[error.start]
    return Problem(
        file, before.count(b"\n") + 1, column, "", f"not UTF-8 text (byte 0x{byte:02x}): save it as UTF-8"
    )


def parse(file: str, text: str) -> tuple[PolicyFile | None, list[Problem], dict[Path_, tuple[int, int]]]:
    """One file's content, or its problems, each at a line and column; and where each value is."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            marks: dict[Path_, tuple[int, int]] = {}
            duplicates: list[Problem] = []
            if node is not None:
                _Expansion().size(node)
                _walk(node, (), marks, duplicates, file)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _Refused as refused:
        return None, [Problem(file, refused.line, refused.column, "", str(refused))], {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        return None, [Problem(file, line, column, "", f"not valid YAML: {error.problem or error}")], {}
    except (yaml.YAMLError, RecursionError) as error:
        return None, [Problem(file, 0, 0, "", f"not valid YAML: {error}")], {}
    if duplicates:
        return None, duplicates, marks
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return (
            None,
            [Problem(file, 1, 1, "", "expected a mapping with `policies:` (and `priority_classes:`)")],
            marks,
        )
    try:
        return PolicyFile.model_validate(data), [], marks
    except ValidationError as error:
        return None, [_problem(file, marks, item) for item in error.errors()], marks
    except RecursionError:
        return None, [Problem(file, 0, 0, "", "nested too deeply to be a policy file")], marks


class _Refused(Exception):
    """A document whose aliases cannot be expanded, at the value they repeat."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.line, self.column = node.start_mark.line + 1, node.start_mark.column + 1


@dataclasses.dataclass
class _Expansion:
    """Sizes the document as construction and validation would see it, each node once: aliases
    make it a graph, which could repeat values exponentially (and _walk visits every repeat)."""

    sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    open: set[int] = dataclasses.field(default_factory=set)
    repeated: int = 0

    def size(self, node: yaml.Node) -> int:
        """How many values node stands for; _Refused past MAX_REPEATED_VALUES or if it holds itself."""
        if id(node) in self.sizes:  # an alias of a value already seen
            self.repeated += self.sizes[id(node)]
            if self.repeated > MAX_REPEATED_VALUES:
                raise _Refused(
                    node, f"aliases repeat more than {MAX_REPEATED_VALUES} values: not a policy file"
                )
            return self.sizes[id(node)]
        if id(node) in self.open:
            raise _Refused(node, "an alias inside its own anchor: a value cannot contain itself")
        self.open.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        size = 1
        for child in children:  # a loop, not sum(...): one frame per level, as deep as the composer's
            size += self.size(child)
        self.sizes[id(node)] = size
        self.open.discard(id(node))
        return self.sizes[id(node)]


def _walk(
    node: yaml.Node, path: Path_, marks: dict[Path_, tuple[int, int]], problems: list[Problem], file: str
) -> None:
    """Record where each value starts; duplicate keys (which YAML would silently take the last of) are
    errors."""
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        keys: set[object] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else repr(key.value)
            if name in keys:
                problems.append(
                    Problem(file, key.start_mark.line + 1, key.start_mark.column + 1, _dotted((*path, name)),
                            "given twice in the same mapping")
                )  # fmt: skip
            keys.add(name)
            marks[(*path, name, "<key>")] = (key.start_mark.line + 1, key.start_mark.column + 1)
            _walk(value, (*path, name), marks, problems, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), marks, problems, file)


def _problem(file: str, marks: dict[Path_, tuple[int, int]], error: Any) -> Problem:
    """A pydantic error placed at the deepest value the YAML has for its location."""
    location: Path_ = ()
    for part in error["loc"]:  # without pydantic's own steps ("[key]", "function-after[...]")
        if not (isinstance(part, str) and "[" in part and (*location, part) not in marks):
            location = (*location, part)
    path = location
    if error["type"] == "extra_forbidden":
        path = (*location[:-1], location[-1], "<key>")
    while path and path not in marks:
        path = path[:-1]
    line, column = marks.get(path, (1, 1))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(location[:-1])
        message = f"unknown field {location[-1]!r}" + (
            f"; allowed here: {', '.join(allowed)}" if allowed else ""
        )
    elif error["type"] != "missing" and "input" in error:
        message = f"{_shown(error['input'])}: {message}"
    return Problem(file, line, column, _dotted(location), message)


def _fields_at(location: Path_) -> list[str]:
    """The field names of the model at location in a PolicyFile, if it is a model."""
    model: Any = PolicyFile
    keyed = False  # the next part is a dict's key (a class name), whatever it is: its values are `model`
    for part in location:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        keyed = typing.get_origin(annotation) is dict
        model = _model_in(annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside Optional[...], list[...] or dict[str, ...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _dotted(location: Path_) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
