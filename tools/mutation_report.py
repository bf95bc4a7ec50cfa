"""Mutation scores per core module, from mutmut's results (`make mutation` runs it after `mutmut run`).

    python -m tools.mutation_report [--min 90] [--module sharding/split.py]

Reads `mutants/<module>.meta` (mutmut 3's verdict per mutant) and the equivalent
mutants listed in docs/testing.md (a table whose first column is the mutant's
name in backticks and whose second is why it changes no behaviour). A module's
score is killed / (mutants - equivalent); a timeout counts as killed (the mutant
made the tests hang: a test noticed). Exit 1 when a module is under `--min` or
has mutants not yet checked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}
EQUIVALENT_ROW = re.compile(r"^\|\s*`([\w.]+__mutmut_\d+)`\s*\|")


def core_modules(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    """The modules `make mutation` mutates: pyproject's [tool.mutmut] only_mutate."""
    try:
        from tomllib import loads
    except ModuleNotFoundError:  # Python 3.10: mutmut depends on `toml` there
        from toml import loads
    return list(loads(pyproject.read_text())["tool"]["mutmut"]["only_mutate"])


def equivalent_mutants(doc: Path = Path("docs/testing.md")) -> set[str]:
    """Mutant names listed as equivalent in the docs (first table column, in backticks)."""
    if not doc.exists():
        return set()
    return {m.group(1) for line in doc.read_text().splitlines() if (m := EQUIVALENT_ROW.match(line))}


def verdicts(module: str, mutants: Path = Path("mutants")) -> dict[str, int | None]:
    """{mutant name: exit code (None: not checked)} of one module; {} before its first run."""
    meta = mutants / f"{module}.meta"
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def score(found: dict[str, int | None], equivalent: set[str]) -> dict:
    """Counts and the score (killed / non-equivalent mutants, None without any) of one module."""
    counted = {k: v for k, v in found.items() if k not in equivalent}
    killed = sum(v in KILLED for v in counted.values())
    unchecked = sum(v is None for v in counted.values())
    survivors = sorted(k for k, v in counted.items() if v is not None and v not in KILLED)
    return {
        "mutants": len(found),
        "equivalent": len(found) - len(counted),
        "killed": killed,
        "not_checked": unchecked,
        "survived": survivors,
        "score": killed / len(counted) if counted else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation_report", description=__doc__.split("\n")[0])
    parser.add_argument("--min", type=float, default=90.0, help="the lowest acceptable score per module, in %%")
    parser.add_argument("--module", action="append", help="only this module (a path in only_mutate)")
    parser.add_argument("--survivors", action="store_true", help="list each surviving mutant")
    args = parser.parse_args(argv)
    equivalent = equivalent_mutants()
    failing = 0
    totals: Counter = Counter()
    print(f"{'module':42s} {'mutants':>7s} {'equiv':>5s} {'killed':>6s} {'survived':>8s} {'score':>6s}")
    for module in args.module or core_modules():
        s = score(verdicts(module), equivalent)
        shown = "—" if s["score"] is None else f"{100 * s['score']:.1f}%"
        print(
            f"{module:42s} {s['mutants']:7d} {s['equivalent']:5d} {s['killed']:6d} {len(s['survived']):8d} {shown:>6s}"
        )
        if s["not_checked"] or s["score"] is None or 100 * s["score"] < args.min:
            failing += 1
        if args.survivors:
            for name in s["survived"]:
                print(f"    survived: {name}")
        totals.update({k: s[k] for k in ("mutants", "equivalent", "killed")})
    print(f"{'all':42s} {totals['mutants']:7d} {totals['equivalent']:5d} {totals['killed']:6d}")
    if failing:
        print(f"{failing} module(s) below {args.min:g}% or not fully checked (mutmut results lists the survivors)")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
