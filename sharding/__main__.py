"""`python -m sharding <command>`: download, phantom, build, verify, inspect.

Every command exits 0 on success, 2 on bad input (with one message saying what
is wrong and how to fix it, no traceback), 1 on a failed check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _cmd_phantom(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sharding import phantom

    counts = phantom.counts_for(args.per_class, args.realistic_ratio, args.full_size)
    try:
        spec = phantom.PhantomSpec(
            counts=counts, seed=args.seed, dup_fraction=args.dup_fraction,
            near_dup_fraction=args.near_dup_fraction, markers=args.markers,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    total = sum(counts)
    start = time.perf_counter()
    written = 0

    with tqdm(total=total, unit="img", desc="phantom", disable=args.quiet) as bar:

        def advance(n: int) -> None:
            nonlocal written
            written += n
            bar.update(n)

        try:
            target = phantom.generate(args.out, spec, workers=args.workers, force=args.force, progress=advance)
        except FileExistsError as exc:
            raise UsageError(str(exc)) from None
    elapsed = time.perf_counter() - start
    if written == 0:
        print(f"phantom: {target} already holds this phantom (seed {args.seed}); nothing to do")
    else:
        print(f"phantom: wrote {total} images + masks to {target} in {elapsed:.1f}s ({total / elapsed:.0f} img/s)")
    if args.contact_sheet:
        Path(args.contact_sheet).parent.mkdir(parents=True, exist_ok=True)
        phantom.contact_sheet(spec).save(args.contact_sheet)
        print(f"phantom: contact sheet {args.contact_sheet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sharding", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="generate synthetic chest films in the Kaggle layout")
    p.add_argument("--out", default="data/raw", help="parent folder of COVID-19_Radiography_Dataset/")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--realistic-ratio", action="store_true", help="scale per-class counts to the real class ratio")
    p.add_argument("--full-size", action="store_true", help="the real counts: 21,165 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markers", action="store_true", help="burn class-correlated text tags into a corner")
    p.add_argument("--dup-fraction", type=float, default=0.02, help="share of exact duplicates within a class")
    p.add_argument("--near-dup-fraction", type=float, default=0.005, help="share of near copies across classes")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--contact-sheet", default=None, help="also write a PNG grid of a few films per class")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left in place", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
