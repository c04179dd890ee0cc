"""Figures measured during the run, and how they reach the docs without being typed by hand.

`measured(line, doc)` prints a figure, repeats it in pytest's end-of-run summary, and conftest.py
writes every figure of the run to test-artifacts/figures.json with the commit and date. Then

    .venv/bin/python -m tests.figures

rewrites the block between the markers in each doc (docs/security.md, operations.md,
deploy.md, your-model.md) from that file. Speed is reported, not asserted: these machines are
shared and noisy.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "test-artifacts" / "figures.json"
DOCS = {
    "security": REPO / "docs" / "security.md",
    "operations": REPO / "docs" / "operations.md",
    "deploy": REPO / "docs" / "deploy.md",
    "your-model": REPO / "docs" / "your-model.md",
}
BEGIN = "<!-- figures measured by the tests: begin (python -m tests.figures writes this) -->"
END = "<!-- figures measured by the tests: end -->"
FIGURES: list[tuple[str, str]] = []  # (doc, line) in the order measured


def measured(line: str, doc: str = "security") -> None:
    """A figure for the end-of-run summary and for `doc` (a key of DOCS)."""
    assert doc in DOCS, doc
    FIGURES.append((doc, line.strip()))
    print(line)


def write_artifact(path: Path = ARTIFACT) -> None:
    """The run's figures with the commit they measured ("+dirty": the work tree differed)."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "figures": [{"doc": doc, "line": line} for doc, line in FIGURES],
    }, indent=1) + "\n")  # fmt: skip


def render(text: str, doc: str, artifact: dict) -> str:
    """`text` with its figures block rewritten from `artifact` (ValueError: no block)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{doc}: needs one '{BEGIN}' ... '{END}' block")
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    lines = [line["line"] for line in artifact["figures"] if line["doc"] == doc]
    block = [
        BEGIN,
        f"Written by `python -m tests.figures` from the `make test` run of commit "
        f"`{artifact['commit']}` on {artifact['date']} (2-core machine, load generator on the "
        "same cores):",
        "",
        *[f"- `{line}`" for line in lines],
        END,
    ]
    return before + "\n".join(block) + after


def main() -> int:
    artifact = json.loads(ARTIFACT.read_text())
    for doc, path in DOCS.items():
        path.write_text(render(path.read_text(), doc, artifact))
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
