"""The README and docs/results.md link into each other by heading anchors; renaming a heading or moving a
section must not leave a link pointing nowhere, and every image they show must exist."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": ROOT / "README.md", "docs/results.md": ROOT / "docs" / "results.md"}
LINK = re.compile(r"\]\(([^)\s]*)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def prose_lines(markdown: str) -> list[str]:
    """The lines outside fenced code blocks (a heading or link inside a code block is not one)."""
    lines, in_code = [], False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside code blocks (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(markdown):
        if re.match(r"#{1,6} ", line):
            base = github_anchor(line)
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


@functools.cache
def anchors_of(file: Path) -> frozenset[str]:
    return frozenset(anchors(file.read_text(encoding="utf-8")))


def broken_links(name: str) -> list[str]:
    """Links of one document whose target file, or anchor in it, does not exist."""
    source = DOCS[name]
    bad = []
    for line in prose_lines(source.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            if not file.exists() or (anchor and anchor not in anchors_of(file)):
                bad.append(target)
    return bad


def test_anchor_rule_matches_github():
    assert github_anchor("### The 3D route's patch augmentation (`configs/a_b.yaml`)") == \
        "the-3d-routes-patch-augmentation-configsa_byaml"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_link_and_image_resolves(name):
    assert broken_links(name) == []
