"""Add a benchmark's row to its own table in docs/benchmarks.md (not at the end of the file)."""

from __future__ import annotations

from pathlib import Path


def append_row(doc: Path, section: str, header: str, row: str) -> None:
    """Add `row` after the last row of the table under `section` (created at the end if absent)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if section not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{section}\n\n{header}\n"
    lines = text.splitlines()
    i = lines.index(section) + 1
    while i < len(lines) and not lines[i].startswith("|"):  # to the table
        i += 1
    while i < len(lines) and lines[i].startswith("|"):  # past its last row
        i += 1
    lines.insert(i, row)
    doc.write_text("\n".join(lines) + "\n")


def append_block(doc: Path, section: str, block: str) -> None:
    """Add `block` (markdown) at the end of `section`, before the next `## ` heading."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if section not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{section}\n"
    lines = text.splitlines()
    i = lines.index(section) + 1
    while i < len(lines) and not lines[i].startswith("## "):
        i += 1
    while i > 0 and not lines[i - 1].strip():  # keep one blank line before the next heading
        i -= 1
    lines[i:i] = ["", *block.rstrip("\n").splitlines()]
    doc.write_text("\n".join(lines) + "\n")
