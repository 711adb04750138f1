"""The docs' links resolve: every relative link in README.md, CONTRIBUTING.md and docs/*.md names an existing file
and, where it has one, an existing heading; every results folder the docs name exists."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
RESULTS_PATH = re.compile(r"(?:docs/)?results/([A-Za-z0-9_]+(?:\.[a-z]+)?)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `-` and `_` kept), spaces
    to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            base = heading_anchor(line.lstrip("#"))
            anchor, repeat = base, 0
            while anchor in found:  # GitHub numbers repeated headings: x, x-1, x-2
                repeat += 1
                anchor = f"{base}-{repeat}"
            found.add(anchor)
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


def test_heading_anchor_follows_github() -> None:
    assert heading_anchor("Synthetic signed axes (Protocols A–C)") == "synthetic-signed-axes-protocols-ac"
    assert heading_anchor("The gate path: why the soft form is the default") == \
        "the-gate-path-why-the-soft-form-is-the-default"
    assert heading_anchor("Adam β1 0 and the `fit` step") == "adam-β1-0-and-the-fit-step"


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Only heading\n[ok](#only-heading) [missing](#nowhere) [file](absent.md)\n")
    assert broken_links(page) == ["#nowhere", "absent.md"]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_named_results_folder_exists(page: Path) -> None:
    named = set(RESULTS_PATH.findall(page.read_text()))
    missing = sorted(name for name in named if not (ROOT / "docs" / "results" / name).exists())
    assert missing == []
