"""The project's docs stand on their own: every relative link in the README and docs/ leads to a
file of the repository, and no tracked file points at the documents the project was specified
from, which a user who clones it does not have."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the specification's files, outside the repository (spelled in pieces so this file is no hit)
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "PROTO" + r"COL\.md", "DES" + r"IGN\.md", "NO" + r"TES\.md"]))
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in names.splitlines()]


def test_no_tracked_file_points_outside_the_repository() -> None:
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the working tree
        hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == []


def test_every_relative_link_in_the_docs_leads_to_a_file() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            if not (doc.parent / target).resolve().exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []
    assert len(docs) > 5
