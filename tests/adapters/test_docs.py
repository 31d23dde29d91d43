"""docs/adapters.md stays true: its relative links and in-page anchors resolve, and its Python blocks run as
written (on a tiny LLaMA standing in for ``base``, ``fresh_base`` and ``other_base``)."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import MODELS  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
TEXT = DOC.read_text()


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, letters, digits, spaces, '-' and '_' kept, spaces to '-'."""
    kept = "".join(ch for ch in heading.strip().lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) == "Nd")
    return kept.replace(" ", "-")


def test_links_resolve():
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", TEXT, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        if path:
            assert (DOC.parent / path).exists(), f"{link}: no file {path}"
        elif anchor:
            assert anchor in anchors, f"{link}: no heading with anchor #{anchor} (have {sorted(anchors)})"


BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_blocks_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks save to relative paths
    build = MODELS["llama"].build
    exec(compile(block, str(DOC), "exec"), {"base": build(), "fresh_base": build(), "other_base": build()})
