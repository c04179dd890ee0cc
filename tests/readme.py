"""The README's examples, as the tests run them."""

from __future__ import annotations

from loadtest.servers import REPO


def readme_block(marker: str, language: str) -> str:
    """The code block that follows `<!-- marker ... -->` in README.md."""
    readme = (REPO / "README.md").read_text()
    after = readme.split(f"<!-- {marker}", 1)[1]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]
