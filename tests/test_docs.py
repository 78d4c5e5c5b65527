"""The documentation holds together: README stays a front door, and every relative link and anchor resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15 * 1024
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# words about how the project was made, not about what it does: a reader cannot act on them
WORK_LOG = re.compile(r"before this change|this session|the issue's goals|runs made while writing", re.I)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '#' line in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no {_shown(dest)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {_shown(dest)})")
    return bad


def test_readme_is_a_front_door():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move detail to docs/ (limit {README_LIMIT})"


def test_every_relative_link_and_anchor_resolves():
    bad = {str(p.relative_to(ROOT)): broken_links(p) for p in DOCS}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_docs_describe_the_product_not_its_making():
    found = {str(p.relative_to(ROOT)): WORK_LOG.findall(p.read_text()) for p in DOCS}
    assert not {k: v for k, v in found.items() if v}, found


def test_the_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) [no anchor](#nowhere)\n")
    assert broken_links(page) == ["missing.md (no missing.md)", "#nowhere (no heading #nowhere in page.md)"]
