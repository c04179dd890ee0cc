"""No figure in the docs is typed by hand: the measured blocks are written from a test run."""

from __future__ import annotations

import pytest

from tests.figures import BEGIN, DOCS, END, render

ARTIFACT = {
    "commit": "0123456789ab",
    "date": "2026-11-30T00:00:00+00:00",
    "figures": [
        {"doc": "security", "line": "overload: served 1 req/s"},
        {"doc": "operations", "line": "drift: alarm"},
        {"doc": "security", "line": "slow bodies: 95%"},
    ],
}


def test_render_rewrites_only_the_block_with_the_commit_and_date():
    text = f"intro\n{BEGIN}\n- `an old figure`\n{END}\nrest\n"
    rendered = render(text, "security", ARTIFACT)
    assert rendered.startswith("intro\n" + BEGIN) and rendered.endswith(END + "\nrest\n")
    assert "an old figure" not in rendered
    assert "commit `0123456789ab` on 2026-11-30T00:00:00+00:00" in rendered
    assert "- `overload: served 1 req/s`\n- `slow bodies: 95%`\n" + END in rendered
    assert "drift" not in rendered
    assert render(rendered, "security", ARTIFACT) == rendered  # idempotent


def test_a_doc_without_its_block_is_an_error():
    with pytest.raises(ValueError, match="needs one"):
        render("no markers here", "security", ARTIFACT)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_each_doc_has_exactly_one_block_written_by_the_command(doc):
    text = DOCS[doc].read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text.split(BEGIN)[1].split(END)[0]
    assert block.strip() == "" or "Written by `python -m tests.figures`" in block
