"""Size limits of the product code: `python -m tools.structure` (run by `make lint`).

Modules of at most 450 lines and functions of at most 80, in every package; the import
rules (one direction of flow, no cycles) are import-linter's contracts in pyproject.toml
(`lint-imports`). Exit 1 listing every offender, else one line with the largest modules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("sharding", "pipeline", "train", "evaluation", "tools")
ROOT = Path(__file__).resolve().parents[1]


def offenders(root: Path, max_module: int, max_function: int) -> tuple[list[str], list[tuple[int, str]]]:
    """(what breaks a limit, (lines, module) for every module)."""
    problems, sizes = [], []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            text = path.read_text()
            lines = len(text.splitlines())
            sizes.append((lines, str(rel)))
            if lines > max_module:
                problems.append(f"module {rel} has {lines} lines > {max_module}")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    size = node.end_lineno - node.lineno + 1
                    if size > max_function:
                        problems.append(f"function {rel}:{node.lineno} {node.name} has {size} lines > {max_function}")
    return problems, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.structure", description=__doc__.splitlines()[0])
    parser.add_argument("--max-module", type=int, default=450)
    parser.add_argument("--max-function", type=int, default=80)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    problems, sizes = offenders(args.root, args.max_module, args.max_function)
    for problem in problems:
        print(f"structure: {problem}", file=sys.stderr)
    if problems:
        return 1
    largest = ", ".join(f"{name} {n}" for n, name in sorted(sizes, reverse=True)[:3])
    print(
        f"structure ok: {len(sizes)} modules <= {args.max_module} lines, functions <= {args.max_function}; "
        f"largest {largest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
