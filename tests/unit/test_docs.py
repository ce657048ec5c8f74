"""The documentation leads and holds together: the README stays short and links the index of the
docs, every page of docs/ is reachable from that index, every relative link (and its #anchor) goes
somewhere, and every README code block either runs in the micro-VM (tests/integration/test_readme.py)
or says why not."""

from __future__ import annotations

import re
from pathlib import Path

from tests.readme_blocks import README, blocks

ROOT = README.parent
DOCS = ROOT / "docs"
PAGES = [
    README,
    *sorted(DOCS.glob("*.md")),
    *(ROOT / name / "README.md" for name in ("systemd", "policies", "exporters")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    """The relative links of a markdown page, outside code blocks."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for heading in re.findall(
        r"^#+ (.+)$",
        re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE),
        re.MULTILINE,
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in found:
            anchor, count = f"{slug}-{count}", count + 1
        found.add(anchor)
    return found


def test_the_readme_is_short_and_links_the_index_of_the_docs() -> None:
    assert len(README.read_text().splitlines()) < 250
    assert "docs/README.md" in links(README)


def test_every_doc_is_reachable_from_the_index() -> None:
    seen, todo = set(), [DOCS / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        if page.suffix == ".md":
            todo += [(page.parent / target.partition("#")[0]).resolve() for target in links(page)]
    assert sorted(str(p.relative_to(ROOT)) for p in set(DOCS.iterdir()) - seen) == []


def test_every_relative_link_and_anchor_exists() -> None:
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert broken == []


def test_every_readme_block_runs_or_says_why_not() -> None:
    assert [problem for block in blocks() if (problem := block.problem())] == []
    assert [
        block.where for block in blocks() if block.not_run is not None and len(block.not_run) < 20
    ] == [], "a reason, please"
