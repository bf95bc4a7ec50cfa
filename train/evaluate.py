"""Moved to `python -m evaluation`; `python -m train.evaluate` keeps working and says where it went."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from evaluation.run import main as moved

    print("note: `python -m train.evaluate` moved to `python -m evaluation` (same arguments)", file=sys.stderr)
    return moved(argv)


if __name__ == "__main__":
    sys.exit(main())
