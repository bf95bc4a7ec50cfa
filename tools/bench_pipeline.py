"""Host input-pipeline benchmark: `python -m tools.bench_pipeline --shards DIR --raw DIR [--workers N] [--json OUT]`.

Measures images/s on the same train samples, with shuffling on (as in training):

- `original`: the original project's approach: per-image PIL open of the raw PNG,
  grayscale, resize to 299, torchvision RandomHorizontalFlip + RandomRotation(10),
  ToTensor, Normalize, through a `torch.utils.data.DataLoader(shuffle=True)`;
- `webdataset_generic`: webdataset's generic chain (WebDataset + shuffle +
  decode + to_tuple + batched, WebLoader);
- `radstream`: this package's host path (`build_loader(...)`, train split: exact
  epochs with the global shuffle, consecutive epochs through the same workers);
- `radstream_mixed`: the same train shards as three collections (a third of the
  shards each, equal weights) through the mixing plan (`pipeline.mix`): what exact
  weighted mixing costs against one collection of the same total size (needs at
  least three train shards; build with a smaller `--shard-size` otherwise); it
  alternates with `radstream`, best of `--repeats` each;
- `memmap_bound`: batched copy of the same bytes out of one `.npy` memmap in
  shuffled index order (in-process; the copy a loader cannot avoid), measured
  before and after the other figures of a row, the larger kept;
- `litdata`, `mosaic_streaming`: the peers, on the same samples written in their
  own formats (`litdata.optimize` + `StreamingDataset`, `MDSWriter` +
  `StreamingDataset`), each the best over its documented throughput settings
  (in-process or the row's worker count, batch 64 or the bench's; see
  `bench_litdata`, `bench_mosaic`), the winning settings in `peer_settings`;
  skipped with a message when not installed; their unshuffled figures are
  recorded beside (`unshuffled`).

Streaming figures are steady-state rates over `--batches` batches after
`--warmup` batches (worker start-up excluded). Also the device augmentation
throughput (`DeviceAugment(train=True)`, batch/s) on the best device present.
Prints a Markdown table and writes JSON: `{"img_per_s": {"workers_1": {...},
"workers_2": {...}}, "unshuffled": ..., "peer_settings": ..., "ratios": ...,
"augment": ..., "config": ..., "machine": ...}`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import DEFAULT_WARP, DeviceAugment
from pipeline.loader import build_loader
from pipeline.samples import read_samples
from pipeline.urls import open_url
from sharding.manifest import SplitInfo, load_manifest, write_manifest
from tools.acquisition_costs import seconds_per_call
from tools.bench_peers import bench_litdata, bench_mosaic, cycle, rate

METHODS = (
    "original",
    "webdataset_generic",
    "radstream",
    "radstream_mixed",
    "memmap_bound",
    "litdata",
    "mosaic_streaming",
)


# --- (a) the original project's approach -------------------------------------------------------


class _PngDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[str], labels: list[int], image_size: int = 299):
        from torchvision import transforms as T

        self.files, self.labels = files, labels
        self.transform = T.Compose(
            [
                T.Grayscale(1),
                T.Resize((image_size, image_size)),
                T.RandomHorizontalFlip(),
                T.RandomRotation(10),
                T.ToTensor(),
                T.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("L")), self.labels[i]


def png_files(raw: Path, classes) -> tuple[list[str], list[int]]:
    """The raw dataset's films (`<class>/images/*.png` anywhere under `raw`) and their labels."""
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(glob.glob(str(raw / "**" / name / "images" / "*.png"), recursive=True))
        files += found
        labels += [c] * len(found)
    if not files:
        raise FileNotFoundError(f"no <class>/images/*.png under {raw}")
    return files, labels


def original_loader(
    raw: Path, classes, batch_size: int, workers: int, image_size: int = 299, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """The original project's loader: per-image PIL decode and torchvision transforms, `DataLoader(shuffle=True)`."""
    files, labels = png_files(raw, classes)
    return torch.utils.data.DataLoader(
        _PngDataset(files, labels, image_size),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )


def bench_original(
    raw: Path, classes, batch_size: int, workers: int, batches: int, warmup: int, image_size: int = 299
) -> float:
    loader = original_loader(raw, classes, batch_size, workers, image_size)
    return rate(cycle(lambda: loader), batches, warmup)


# --- (b) webdataset's generic chain ------------------------------------------------------------


def bench_webdataset(urls: list[str], batch_size: int, workers: int, batches: int, warmup: int, shuffle: int) -> float:
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
        .repeat()
        .shuffle(shuffle)
        .decode()
        .to_tuple("image.npy", "cls")
        .batched(batch_size, partial=False)
    )
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    return rate(loader, batches, warmup)


# --- (c) radstream -----------------------------------------------------------------------------


def bench_radstream(shards: Path, batch_size: int, workers: int, batches: int, warmup: int, shuffle: int) -> float:
    loader = build_loader(shards, "train", batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle)
    # consecutive exact epochs through the same workers: a steady-state figure with the global shuffle on
    return rate(loader.iter_epochs(math.ceil((batches + warmup) / loader.steps_per_epoch) + 1), batches, warmup)


def split_collections(shards: Path, manifest, work: Path, parts: int = 3) -> list[dict] | None:
    """The train shards as `parts` collections (symlinked folders, each with its manifest); None with fewer shards."""
    train = manifest.split("train").shards
    if len(train) < parts:
        return None
    out = []
    for k in range(parts):
        mine = train[k::parts]
        folder = work / f"collection_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for info in mine:
            link = folder / info.name
            if not link.exists():
                link.symlink_to((shards / info.name).resolve())
        counts = tuple(sum(i.class_counts[c] for i in mine) for c in range(len(manifest.classes)))
        empty = SplitInfo((), (0,) * len(manifest.classes))
        splits = {"train": SplitInfo(tuple(mine), counts), "val": empty, "test": empty}
        write_manifest(replace(manifest, splits=splits), folder)
        out.append({"path": str(folder), "name": f"part{k}"})
    return out


def bench_radstream_mixed(
    collections: list[dict], batch_size: int, workers: int, batches: int, warmup: int, shuffle: int
) -> float:
    loader = build_loader(collections, "train", batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle)
    return rate(loader.iter_epochs(math.ceil((batches + warmup) / loader.steps_per_epoch) + 1), batches, warmup)


# --- (d) the memmap bound ----------------------------------------------------------------------


def load_train_arrays(shards: Path, manifest) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for url in manifest.shard_urls("train", shards):
        with open_url(url) as fh:
            for s in read_samples(
                fh,
                encoding=manifest.encoding,
                image_size=manifest.image_size,
                num_classes=len(manifest.classes),
                masks=False,
            ):
                images.append(np.array(s.image))
                labels.append(s.label)
    return np.stack(images), np.array(labels, np.int64)


def bench_memmap(npy: Path, batch_size: int, batches: int, warmup: int) -> float:
    mm = np.load(npy, mmap_mode="r")
    rng = np.random.default_rng(0)

    def gen():
        while True:
            order = rng.permutation(len(mm))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield torch.from_numpy(mm[np.sort(order[i : i + batch_size])])

    return rate(gen(), batches, warmup)


# --- device augmentation -----------------------------------------------------------------------


def bench_augment(
    batch_size: int,
    image_size: int,
    seconds: float = 3.0,
    *,
    warp: str = DEFAULT_WARP,
    masks: bool = True,
    cpu_batch_cap: int | None = 64,
) -> dict:
    """`DeviceAugment(train=True, warp=warp)` batches per second on the best device present (CPU batches capped)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cpu_batch_cap:
        batch_size = min(batch_size, cpu_batch_cap)
    aug = DeviceAugment(train=True, warp=warp).to(device)
    x = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, device=device)
    m = torch.randint(0, 2, x.shape, dtype=torch.uint8, device=device) if masks else None
    per_call = seconds_per_call(aug, x, m, seconds)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": f"{device.type} ({name})",
        "warp": warp,
        "batch_size": batch_size,
        "batch_per_s": 1.0 / per_call,
        "img_per_s": batch_size / per_call,
    }


# --- driver ------------------------------------------------------------------------------------


def _versions() -> dict:
    out = {}
    for mod in ("torch", "numpy", "webdataset", "kornia", "litdata", "streaming", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def measure_peers(args, images, labels, work: Path, workers: int, row: dict, unshuffled: dict, results: dict) -> None:
    """LitData and Mosaic at their best settings into `row` (a failing or missing peer is recorded, not fatal)."""
    for name, fn in (("litdata", bench_litdata), ("mosaic_streaming", bench_mosaic)):
        row[name] = None
        if not args.peers:
            results["skipped"][name] = "--no-peers"
            continue
        try:
            rates = fn(images, labels, work, args.batch_size, workers, args.batches, args.warmup)
        except ImportError as exc:
            results["skipped"][name] = f"not installed ({exc}); pip install '.[bench]'"
            print(f"{name}: skipped, not installed (pip install '.[bench]')")
            continue
        except Exception as exc:  # noqa: BLE001 - a peer failing must not hide the other figures
            results["skipped"][name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        (row[name], on), (unshuffled[name], off) = rates[True], rates[False]
        results["peer_settings"].setdefault(f"workers_{workers}", {})[name] = {"shuffled": on, "unshuffled": off}
        print(f"{name:19s} {row[name]:10.0f} img/s (unshuffled {unshuffled[name]:.0f}); best settings {on}")


def measure_row(args, manifest, images, labels, npy: Path, work: Path, workers: int, results: dict) -> None:
    """Every pipeline with `workers` loader workers, into results["img_per_s"]["workers_N"]."""
    shards, b, warm, n = Path(args.shards), args.batch_size, args.warmup, args.batches
    row: dict[str, float | None] = {}
    unshuffled: dict[str, float | None] = {}
    print(f"-- {workers} worker(s)")
    bound_before = bench_memmap(npy, b, n, warm)
    row["original"] = bench_original(
        Path(args.raw), manifest.classes, b, workers, max(2, n // 4), 1, manifest.image_size
    )
    print(f"original            {row['original']:10.0f} img/s")
    urls = manifest.shard_urls("train", shards)
    row["webdataset_generic"] = bench_webdataset(urls, b, workers, n, warm, args.shuffle)
    print(f"webdataset_generic  {row['webdataset_generic']:10.0f} img/s")
    # radstream and radstream_mixed alternate, best of --repeats each: their ratio is what the mix costs
    parts = split_collections(shards, manifest, work)
    single, mixed = [], []
    for _ in range(args.repeats):
        single.append(bench_radstream(shards, b, workers, n, warm, args.shuffle))
        if parts:
            mixed.append(bench_radstream_mixed(parts, b, workers, n, warm, args.shuffle))
    row["radstream"], row["radstream_mixed"] = max(single), max(mixed) if mixed else None
    print(f"radstream           {row['radstream']:10.0f} img/s")
    if parts:
        print(f"radstream_mixed     {row['radstream_mixed']:10.0f} img/s (3 collections)")
    else:
        print("radstream_mixed     skipped: fewer than 3 train shards (build with a smaller --shard-size)")
    # the bound is taken twice (before and after) and the larger kept: a conservative ratio on a busy machine
    row["memmap_bound"] = max(bound_before, bench_memmap(npy, b, n, warm))
    print(f"memmap_bound        {row['memmap_bound']:10.0f} img/s")
    measure_peers(args, images, labels, work, workers, row, unshuffled, results)
    results["img_per_s"][f"workers_{workers}"] = row
    results["unshuffled"][f"workers_{workers}"] = unshuffled


def ratios(img_per_s: dict) -> dict:
    out = {}
    for key, row in img_per_s.items():
        r = row["radstream"]
        out[key] = {
            "radstream_vs_memmap_bound": r / row["memmap_bound"],
            "radstream_vs_original": r / row["original"],
            "radstream_vs_webdataset_generic": r / row["webdataset_generic"],
            **({"mixed_vs_radstream": row["radstream_mixed"] / r} if row.get("radstream_mixed") else {}),
            **{f"radstream_vs_{p}": r / row[p] for p in ("litdata", "mosaic_streaming") if row.get(p)},
        }
    if "workers_1" in img_per_s and "workers_2" in img_per_s:
        out["radstream_2_vs_1_workers"] = img_per_s["workers_2"]["radstream"] / img_per_s["workers_1"]["radstream"]
    return out


def run(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()
    shards = Path(args.shards)
    manifest = load_manifest(shards)
    if manifest.encoding != "raw":
        print(f"note: shards are {manifest.encoding}-encoded; radstream uses the generic decode path")
    work = Path(args.work or tempfile.mkdtemp(prefix="radstream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    images, labels = load_train_arrays(shards, manifest)
    npy = work / "train_images.npy"
    np.save(npy, images)
    results: dict = {"img_per_s": {}, "unshuffled": {}, "peer_settings": {}, "skipped": {}}
    for workers in args.workers:
        measure_row(args, manifest, images, labels, npy, work, workers, results)
    results["ratios"] = ratios(results["img_per_s"])
    results["augment"] = bench_augment(args.batch_size, manifest.image_size, args.augment_seconds)
    results["config"] = {
        "batch_size": args.batch_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "shuffle_buffer": args.shuffle,
        "train_samples": int(len(labels)),
        "shards": str(shards),
        "raw": str(args.raw),
    }
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "load_avg_at_start": load_start,
        "load_avg_at_end": os.getloadavg(),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict) -> str:
    cols = list(results["img_per_s"])
    lines = [
        "| pipeline (img/s, shuffled) | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in METHODS:
        cells = []
        for c in cols:
            v = results["img_per_s"][c].get(m)
            u = results["unshuffled"].get(c, {}).get(m)
            cell = "skipped" if v is None else f"{v:,.0f}"
            if u:
                cell += f" ({u:,.0f} unshuffled)"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for c in cols:
        r = results["ratios"][c]
        lines.append(
            f"\n{c}: radstream = {r['radstream_vs_memmap_bound']:.0%} of the memmap bound, "
            f"{r['radstream_vs_original']:.0f}x original, {r['radstream_vs_webdataset_generic']:.1f}x "
            "webdataset generic"
            + "".join(f", {r[k]:.1f}x {k[13:]}" for k in r if k.endswith(("litdata", "streaming")))
            + (f"; 3 mixed collections = {r['mixed_vs_radstream']:.1%} of one" if "mixed_vs_radstream" in r else "")
        )
    if "radstream_2_vs_1_workers" in results["ratios"]:
        lines.append(f"radstream 2 workers / 1 worker: {results['ratios']['radstream_2_vs_1_workers']:.2f}x")
    a = results["augment"]
    lines.append(
        f"DeviceAugment(train=True, warp={a['warp']}) on {a['device']}: {a['batch_per_s']:.1f} batch/s "
        f"of {a['batch_size']} ({a['img_per_s']:,.0f} img/s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="shard folder with manifest.json (raw encoding)")
    parser.add_argument("--raw", required=True, help="raw dataset folder (for the original-project baseline)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default 1 2)")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per figure")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="radstream and radstream_mixed: best of this many")
    parser.add_argument("--shuffle", type=int, default=2000, help="shuffle buffer (samples)")
    parser.add_argument("--work", default=None, help="scratch folder for peer formats (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--augment-seconds", type=float, default=3.0, help="time spent timing DeviceAugment")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip litdata and mosaic streaming")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args)
    print()
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
