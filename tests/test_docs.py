"""The manual: at most 600 lines, every link between the README and docs/ lands on a heading that
exists, and nothing the user cannot have is cited."""
import glob
import os
import re

from tests.conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    found = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def documents() -> list[str]:
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_readme_is_a_manual_of_at_most_600_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 600
    for heading in ("## Quick start", "## Which training images made the network do this?", "## Settings",
                    "## Data", "## Troubleshooting", "## Results on one screen"):
        assert heading in text


def test_every_link_lands_on_a_file_and_heading_that_exist():
    broken = []
    for doc in documents():
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(doc, ROOT)}: {target} (no file)")
            elif anchor and file.endswith(".md") and anchor not in anchors(file):
                broken.append(f"{os.path.relpath(doc, ROOT)}: {target} (no heading)")
    assert not broken, "\n".join(broken)


def test_nothing_the_user_cannot_have_is_cited():
    for doc in documents():
        with open(doc, encoding="utf-8") as f:
            assert "shared/reference" not in f.read(), doc
