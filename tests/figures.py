"""Figures measured during the run, printed again in pytest's end-of-run summary (conftest.py)."""

from __future__ import annotations

FIGURES: list[str] = []


def measured(line: str) -> None:
    """A figure for the end-of-run summary, so CI's log shows it (speed is reported, not
    asserted: these machines are shared and noisy)."""
    FIGURES.append(line.strip())
    print(line)
