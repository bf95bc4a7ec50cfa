"""Markdown pieces shared by the report modules."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> list[str]:
    """A GitHub-flavoured markdown table, one line per row."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
