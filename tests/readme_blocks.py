"""The README's code blocks as tests/integration/test_readme.py runs them and tests/unit/test_docs.py
checks them: a ```console block is a transcript (a line starting with "# " or "$ " is a command, the
lines up to the next command its output, where "..." stands for any text), a ```sh block a script
that must succeed, and any block that cannot run in the micro-VM says why on the line before it:
`<!-- not run: REASON -->`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = ("console", "sh")
NOT_RUN = re.compile(r"<!-- not run: (.+) -->")
PROMPT = re.compile(r"^[#$] ")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, from 1
    language: str
    text: str
    not_run: str | None  # the reason given, if marked

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    def problem(self) -> str | None:
        """Why this block can be neither run nor skipped, or None."""
        if self.not_run is None and self.language not in RUNNABLE:
            return (
                f"{self.where}: a ```{self.language or '(no language)'} block cannot be run: make it "
                f"```sh or ```console, or say why not on the line before it: <!-- not run: REASON -->"
            )
        if self.language == "console" and self.not_run is None and not PROMPT.match(self.text):
            return f"{self.where}: a ```console block starts with a command (# or $ and a space)"
        return None


def blocks(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"```(\S*)\s*", lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        mark = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
        found.append(
            Block(
                index + 1,
                opening.group(1),
                "\n".join(lines[index + 1 : end]),
                mark.group(1) if mark else None,
            )
        )
        index = end + 1
    return found


def transcript(block: Block) -> list[tuple[str, str]]:
    """A console block's (command, expected output) pairs."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if PROMPT.match(line):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line.rstrip())
    return [(command, "\n".join(output).strip("\n")) for command, output in pairs]


def matches(expected: str, output: str) -> bool:
    """Output as a transcript shows it: line by line, trailing blanks aside, "..." for any text."""
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    tidy = "\n".join(line.rstrip() for line in output.strip("\n").splitlines())
    return re.fullmatch(pattern, tidy, re.DOTALL) is not None
