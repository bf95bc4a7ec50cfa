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
            counts=counts,
            seed=args.seed,
            dup_fraction=args.dup_fraction,
            near_dup_fraction=args.near_dup_fraction,
            markers=args.markers,
            format=args.format,
            site_styles=args.site_styles,
            site=args.site,
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


def _cmd_download(args: argparse.Namespace) -> int:
    from sharding.download import CredentialsError, DownloadError, download

    try:
        target, fetched = download(args.out, dataset=args.dataset)
    except (CredentialsError, DownloadError) as exc:
        raise UsageError(str(exc)) from None
    if fetched:
        print(f"download: {target} is ready")
    else:
        print(f"download: {target} already holds the dataset; nothing to do")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from sharding.build import BuildError, run_build
    from sharding.inspect import summary

    try:
        report = run_build(
            args.raw,
            args.out,
            labels=args.labels,
            classes=[c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None,
            split_by=args.split_by,
            encoding=args.encoding,
            include_masks=args.include_masks,
            shard_size=args.shard_size,
            workers=args.workers,
            seed=args.seed,
            near_dup_distance=args.near_dup_distance,
            strict=args.strict,
            force=args.force,
            progress=not args.quiet,
            shard_delay_s=args.shard_delay_s,
            executor=args.executor,
            ray_address=args.ray_address,
            lung_model=args.lung_model,
        )
    except BuildError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # disk full, file size limit, unwritable folder: the previous set is still in place
        where = f" ({exc.filename})" if exc.filename else ""
        raise UsageError(
            f"cannot write the shard set {args.out}: {exc.strerror or exc}{where}; "
            f"nothing was replaced (any previous set in {args.out} is intact)"
        ) from None
    m = report.manifest
    if report.noop:
        print(f"build: {report.out} is up to date with {args.raw} and these options; nothing to do (--force rebuilds)")
        return 0
    print(summary(m, report.elapsed))
    split = m.build.get("split") or {}
    print(
        f"input: {m.build.get('input')} ({len(m.classes)} classes: {', '.join(m.classes)}); split by "
        f"{split.get('by')}, every class within {split.get('max_class_deviation')} of its 80/10/10 target"
    )
    for note in m.build.get("notes", []):
        print(f"note: {note}")
    print(
        f"build: wrote {m.counts['written']} samples in "
        f"{sum(len(s.shards) for s in m.splits.values())} shards to {report.out} "
        f"(analyse {report.analyse_s:.1f}s, write {report.write_s:.1f}s, {_peak_rss()})"
    )
    return 0


def _peak_rss() -> str:
    """Peak resident memory of this process and of its largest child (the workers), Linux/macOS."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return "peak RSS unknown"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    text = f"peak RSS {own / 2**20:,.0f} MiB"
    return text + (f", largest worker {kids / 2**20:,.0f} MiB" if kids else "")


def _cmd_verify(args: argparse.Namespace) -> int:
    from sharding.manifest import ManifestError
    from sharding.verify import verify

    try:
        result = verify(args.shards)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    if result.ok:
        print(f"OK: {result.shards} shards, {result.samples} samples match {args.shards}/manifest.json")
        return 0
    for problem in result.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    bad = sorted({p.split(":", 1)[0] for p in result.problems})
    print(f"verify: {len(result.problems)} problem(s) in {', '.join(bad)}", file=sys.stderr)
    return 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sharding.inspect import sample_grid, summary
    from sharding.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.shards)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    print(summary(manifest))
    if args.out:
        path = sample_grid(args.shards, args.out, per_class=args.per_class)
        print(f"inspect: wrote a grid of up to {args.per_class} samples per class to {path}")
    return 0


def _add_build(sub) -> None:
    """The `build` subcommand and its options."""
    p = sub.add_parser("build", help="raw dataset -> WebDataset shards per split + manifest.json")
    p.add_argument(
        "--raw",
        default="data/raw",
        help="the inputs: the Kaggle layout (data/raw or COVID-19_Radiography_Dataset), class folders "
        "(<raw>/<class>/**/<image>), or the folder a --labels CSV's paths are relative to",
    )
    p.add_argument("--out", default="shards", help="shard folder (replaced atomically)")
    p.add_argument("--labels", default=None, metavar="CSV", help="label CSV: path,label[,patient_id][,source]")
    p.add_argument("--classes", default=None, metavar="A,B,C", help="class order or subset (default: from the data)")
    p.add_argument(
        "--split-by",
        choices=("patient", "source"),
        default="patient",
        help="patient (default): a patient's films share a split when ids are known; source: each source "
        "(site) stays in one split, for a held-out-site test",
    )
    p.add_argument(
        "--encoding",
        choices=("raw", "png"),
        default="raw",
        help="raw: uint8 .npy, no decoding (default); png: about 2x smaller",
    )
    p.add_argument("--include-masks", action="store_true", help="store the lung masks (299x299, {0,1})")
    p.add_argument(
        "--lung-model",
        default=None,
        metavar="PATH",
        help="a lung segmenter (python -m train.lungs fit) that predicts the masks films lack; implies "
        "--include-masks; each predicted mask's json names the segmenter's sha256",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count); with ray, local CPUs")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="what runs the two passes: a local process pool, or Ray tasks (pip install -e '.[ray]'); same bytes",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (auto, or HOST:PORT of the head) instead of starting a local Ray instance",
    )
    p.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    p.add_argument(
        "--near-dup-distance",
        type=int,
        default=None,
        metavar="D",
        help="also group images whose 256-bit perceptual hash differs in <= D bits (off by default; try 6)",
    )
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any input would be skipped")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs and options are unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # fault tests' window to kill a build mid-way; not for users, so not in --help
    p.add_argument("--shard-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_build)


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
    p.add_argument(
        "--format",
        choices=("png", "dicom"),
        default="png",
        help="png (default), or dicom: the same pixels as DICOM films (MONOCHROME1, 12-bit rescaled and "
        "windowed ones among them); labels.csv beside them either way",
    )
    p.add_argument(
        "--site-styles",
        action="store_true",
        help="each source acquires in its own style (tone, sharpness, grain, resolution, border, text, "
        "patient placement), correlated with the class as in the real data",
    )
    p.add_argument(
        "--site",
        default=None,
        metavar="NAME",
        help="every film (all classes) from one new site NAME in its own, unseen style: an external test set",
    )
    p.add_argument("--dup-fraction", type=float, default=0.02, help="share of exact duplicates within a class")
    p.add_argument("--near-dup-fraction", type=float, default=0.005, help="share of near copies across classes")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--contact-sheet", default=None, help="also write a PNG grid of a few films per class")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("download", help="fetch the Kaggle dataset (needs Kaggle credentials)")
    p.add_argument("--out", default="data/raw", help="parent folder of COVID-19_Radiography_Dataset/")
    p.add_argument("--dataset", default="tawsifurrahman/covid19-radiography-database", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_download)

    _add_build(sub)

    p = sub.add_parser("verify", help="re-hash shards and decode every sample against the manifest")
    p.add_argument("--shards", default="shards")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("inspect", help="print the manifest summary and write a PNG grid of samples")
    p.add_argument("--shards", default="shards")
    p.add_argument("--out", default=None, help="PNG path for the grid")
    p.add_argument("--per-class", type=int, default=6)
    p.set_defaults(func=_cmd_inspect)
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
