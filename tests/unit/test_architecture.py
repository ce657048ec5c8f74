"""The layers of docs/architecture.md are the code's: every import of every cgctl module (module- and
function-level; `if TYPE_CHECKING:` ones exempt, as they never run) goes to its own package or to a
layer below its own, never to a peer of its layer, with no cycles; and every top-level module or
package of cgctl/ is in the picture. A failure prints the offending imports."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cgctl"
# The entry point `python -m cgctl`, which the picture counts as cli. The package's own __init__
# (`from cgctl import __version__`), "" below, counts as a layer below the bottom.
PLACED_WITH = {"__main__": "cli"}


def picture_layers() -> list[list[str]]:
    """The layers, top to bottom: each line of the picture's text block with [names] in it."""
    text = (ROOT / "docs/architecture.md").read_text()
    block = re.search(r"```text\nlayers, top to bottom.*?\n```", text, re.DOTALL)
    assert block, (
        "docs/architecture.md: the picture (a ```text block starting 'layers, top to bottom') is gone"
    )
    return [names for line in block.group().splitlines() if (names := re.findall(r"\[(\w+)\]", line))]


def modules() -> dict[str, Path]:
    """Every module of cgctl by its dotted name (a package by its own)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(
    name: str, path: Path, known: dict[str, Path], type_checking: bool = False
) -> list[tuple[int, str]]:
    """(line, module of cgctl) for each import in the module that runs, and with `type_checking`
    those under `if TYPE_CHECKING:` too."""
    tree = ast.parse(path.read_text(), str(path))
    exempt = (
        set()
        if type_checking
        else {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
    )
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base] if base else parents)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from cgctl.x import name`: module cgctl.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((node.lineno, target))
    return found


def top(name: str) -> str:
    """The top-level module or package of cgctl a dotted name belongs to ("" for cgctl itself)."""
    first = name.split(".")[1] if "." in name else ""
    return PLACED_WITH.get(first, first)


def test_every_top_level_module_is_in_the_picture() -> None:
    pictured = {name for layer in picture_layers() for name in layer}
    tops = {top(name) for name in modules()} - {""}
    assert sorted(tops - pictured) == [], (
        "top-level modules of cgctl/ missing from docs/architecture.md's picture"
    )


def test_no_module_imports_a_layer_above_its_own_or_a_peer() -> None:
    layers = picture_layers()
    level = {name: depth for depth, layer in enumerate(layers) for name in layer} | {"": len(layers)}
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        for line, target in imports(name, path, known):
            source, into = top(name), top(target)
            if source == into or source not in level or into not in level:
                continue  # its own package; a module missing from the picture fails the test above
            if level[into] <= level[source]:
                where = "above its own" if level[into] < level[source] else "a peer in its own layer"
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: imports {target}, {where} ({into} over {source})"
                )
    assert wrong == [], "\n".join(["imports against docs/architecture.md's layers:", *wrong])


def test_no_import_cycles() -> None:
    """TYPE_CHECKING imports count here: a cycle hidden behind them is still two modules that cannot
    be understood, or moved, one without the other."""
    known = modules()
    graph = {
        name: {target for _, target in imports(name, path, known, type_checking=True)}
        for name, path in known.items()
    }
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"an import cycle: {' -> '.join(error.args[1])}") from None
