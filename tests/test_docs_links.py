"""The README and docs/results.md link into each other by heading anchors; renaming a heading or moving a
section must not leave a link pointing nowhere, and every image they show must exist."""
from __future__ import annotations

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


def anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside code blocks (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out, in_code = set(), False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"#{1,6} ", line):
            base = github_anchor(line)
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def outside_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def broken_links(name: str) -> list[str]:
    """Links of one document whose target file, or anchor in it, does not exist."""
    source = DOCS[name]
    bad = []
    for target in LINK.findall(outside_code(source.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            bad.append(target)
        elif anchor and anchor not in anchors(file.read_text(encoding="utf-8")):
            bad.append(target)
    return bad


def test_anchor_rule_matches_github():
    assert github_anchor("### The 3D route's patch augmentation (`configs/a_b.yaml`)") == \
        "the-3d-routes-patch-augmentation-configsa_byaml"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_link_and_image_resolves(name):
    assert broken_links(name) == []
