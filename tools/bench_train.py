"""Training-throughput benchmark: is the input pipeline the bottleneck, and by how much?

    python -m tools.bench_train --shards S [--raw R] [--model resnet18] [--image-size 299] [--batch-size 256]
        [--precision no|bf16|fp16] [--channels-last | --no-channels-last] [--compile] [--workers N]
        [--steps N] [--warmup N] [--json OUT]

On the device present (CUDA if available, else CPU), the training step of
`train.loop.train_step` (DeviceAugment, forward and loss under autocast,
backward, Adam; model, loss and augmentation built as `train/trainer.py` builds
them) is fed three ways:

- `model_only`: one synthetic uint8 batch already on the device: the ceiling
  any input pipeline can reach;
- `radstream`: the train loader of `train/presets.py` (exact epochs, global
  shuffle), pinned memory and non-blocking copies on CUDA;
- `original`: the seed project's per-image PIL + torchvision `DataLoader`
  (`tools.bench_pipeline.original_loader`, augmentation on the host, so the step
  skips DeviceAugment), from the raw films of `--raw`; skipped without it.

Each is timed over `--steps` steps after `--warmup` (compilation and cuDNN
autotuning fall in the warmup): images/s, the share of the window spent blocked
on the next batch (data wait), and peak device memory. The host waits for the
device only at the two ends of a window. Also the augmentation alone, per warp
implementation (`augment` -> kornia, torch) at the training batch size, and the
largest pixel difference between the two for the same parameters.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.augment import DEFAULT_WARP, WARPS, DeviceAugment
from pipeline.batch import Batch
from pipeline.collection import open_collections
from pipeline.loader import load_shard_manifest
from sharding.manifest import Manifest
from tools.acquisition_costs import acquisition_costs, describe
from tools.bench_peers import cycle
from tools.bench_pipeline import bench_augment, original_loader
from train.config import Config, load_config
from train.loop import device_batches, train_step
from train.optim import build_loss
from train.presets import build_augment, build_split_loader, masks_used
from train.trainer import build_state

FEEDS = ("model_only", "radstream", "original")


@dataclass(frozen=True)
class Settings:
    """Every setting of a benchmark run (the JSON's `settings`)."""

    shards: str
    raw: str | None = None
    model: str = "resnet18"
    image_size: int = 299
    batch_size: int = 256
    precision: str = "no"
    channels_last: bool = True
    compile: bool = False
    workers: int = 4
    steps: int = 50
    warmup: int = 10
    warp: str = DEFAULT_WARP
    augment_seconds: float = 3.0
    seed: int = 0


@dataclass
class Figures:
    img_per_s: float
    data_wait_frac: float
    peak_mem_bytes: int | None
    steps: int
    seconds: float


def run_config(s: Settings) -> Config:
    """The training config these settings stand for (what train/main.py would run)."""
    overrides = {
        "data.shards": s.shards,
        "data.image_size": s.image_size,
        "data.num_workers": s.workers,
        # a one-time cost of a run's first pass over each shard, not steady state
        "data.verify_checksums": "false",
        "data.warp": s.warp,
        "model.name": s.model,
        "model.channels_last": str(s.channels_last).lower(),
        "model.compile": str(s.compile).lower(),
        "train.batch_size": s.batch_size,
        "train.mixed_precision": f"'{s.precision}'",  # quoted: YAML reads a bare no as false
        "train.seed": s.seed,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[Batch], object], batches: Iterator[Batch], device: torch.device, s: Settings) -> Figures:
    """Steps over `s.steps` batches after `s.warmup`; the host syncs with the device only at the window's ends."""
    waits = [0.0]
    stream = device_batches(batches, device, waits)
    for batch in itertools.islice(stream, s.warmup):
        step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waits[0], images, steps, began = 0.0, 0, 0, time.perf_counter()
    for batch in itertools.islice(stream, s.steps):
        step(batch)
        images, steps = images + len(batch), steps + 1
    synchronize(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Figures(images / seconds, waits[0] / seconds, peak, steps, seconds)


def synthetic_batch(s: Settings, manifest: Manifest, device: torch.device) -> Iterator[Batch]:
    """The same uint8 batch, already on the device, forever (what a perfect input pipeline would hand over)."""
    gen = torch.Generator().manual_seed(s.seed)
    size, n = manifest.image_size, s.batch_size
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, len(manifest.classes), (n,), generator=gen)
    return itertools.repeat(Batch(images=images, labels=labels, keys=[""] * n).to(device))


def radstream_batches(cfg: Config, manifest: Manifest, s: Settings, device: torch.device) -> Iterator[Batch]:
    """The training loader, pinned on CUDA, over as many consecutive epochs as the window needs."""
    loader = build_split_loader(
        cfg, "train", manifest=manifest, pin_memory=device.type == "cuda", masks=masks_used(cfg)
    )
    return loader.iter_epochs(math.ceil((s.steps + s.warmup) / loader.steps_per_epoch) + 1)


def original_batches(manifest: Manifest, s: Settings, device: torch.device) -> Iterator[Batch]:
    """The seed project's loader, endlessly; pinned on CUDA too (a peer at its best settings)."""
    assert s.raw is not None
    loader = original_loader(
        Path(s.raw), manifest.classes, s.batch_size, s.workers, s.image_size, pin_memory=device.type == "cuda"
    )
    return (Batch(images=x, labels=y, keys=[""] * len(y)) for x, y in cycle(lambda: loader))


def host_augmented(channels_last: bool) -> Callable:
    """The step's augmentation for batches the host already augmented and normalised: the memory format only."""

    def augment(images: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator | None = None):
        return (images.contiguous(memory_format=torch.channels_last) if channels_last else images), masks

    return augment


def augment_figures(s: Settings, stored_size: int) -> dict:
    """Each warp's img/s at the training batch size, and their largest pixel difference for the same parameters."""
    rates = {
        w: bench_augment(s.batch_size, stored_size, s.augment_seconds, warp=w, masks=False, cpu_batch_cap=None)
        for w in sorted(WARPS)
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randint(0, 256, (min(s.batch_size, 32), 1, stored_size, stored_size), dtype=torch.uint8, device=device)
    augs = [DeviceAugment(train=True, warp=w) for w in sorted(WARPS)]
    outs = [a(x, generator=torch.Generator(device=device).manual_seed(s.seed))[0] for a in augs]
    # back to the [0, 1] scale of the warped film (the outputs are normalised)
    diff = max((outs[0] - o).abs().max().item() for o in outs[1:]) * augs[0].std
    return {
        "img_per_s": {w: r["img_per_s"] for w, r in rates.items()},
        "batch_size": rates[s.warp]["batch_size"],
        "image_size": stored_size,
        "max_abs_diff": diff,  # on the [0, 1] scale: x 255 for grey levels
    }


def run(s: Settings) -> dict:
    """The three feeds, the augmentation figures and the ratios, as the JSON `--json` writes."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=s.precision)
    device = accelerator.device
    cfg = run_config(s)
    manifest = load_shard_manifest(s.shards)
    data = open_collections(s.shards)
    state = build_state(cfg, accelerator, data, build_split_loader(cfg, "train", collections=data))
    loss_fn = build_loss(cfg.optim, manifest.split("train").class_counts, device)
    augment = build_augment(cfg, train=True).to(device)
    generator = torch.Generator(device=device).manual_seed(s.seed)

    def stepper(aug: Callable) -> Callable[[Batch], object]:
        return lambda batch: train_step(
            state.model, state.optimizer, batch, aug, loss_fn, accelerator, generator=generator
        )

    figures: dict[str, Figures | None] = {}
    skipped: dict[str, str] = {}
    figures["model_only"] = measure(stepper(augment), synthetic_batch(s, manifest, device), device, s)
    figures["radstream"] = measure(stepper(augment), radstream_batches(cfg, manifest, s, device), device, s)
    if s.raw is None:
        figures["original"], skipped["original"] = None, "no --raw folder of PNG films given"
    else:
        original = original_batches(manifest, s, device)
        figures["original"] = measure(stepper(host_augmented(s.channels_last)), original, device, s)
    result = report(s, figures, skipped, augment_figures(s, manifest.image_size), manifest)
    result["acquisition"] = acquisition_costs(s.batch_size, manifest.image_size, s.image_size, s.augment_seconds / 3)
    return result


def report(s: Settings, figures: dict, skipped: dict, augment: dict, manifest: Manifest) -> dict:
    def per_feed(field: str) -> dict:
        return {k: None if f is None else getattr(f, field) for k, f in figures.items()}

    rate = per_feed("img_per_s")
    cuda = torch.cuda.is_available()
    return {
        "img_per_s": rate,
        "data_wait_frac": per_feed("data_wait_frac"),
        "peak_mem_bytes": per_feed("peak_mem_bytes"),
        "seconds": per_feed("seconds"),
        "ratios": {
            "radstream_vs_model_only": rate["radstream"] / rate["model_only"],
            "radstream_vs_original": rate["radstream"] / rate["original"] if rate["original"] else None,
        },
        "augment": augment["img_per_s"],
        "augment_check": {k: v for k, v in augment.items() if k != "img_per_s"},
        "skipped": skipped,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {
            **asdict(s),
            "stored_size": manifest.image_size,
            "classes": list(manifest.classes),
            "train_samples": manifest.split("train").samples,
            "pinned_non_blocking": cuda,
            "verify_checksums": False,
        },
    }


def table(r: dict) -> str:
    """A Markdown table a person can paste, and the ratios under it."""
    st = r["settings"]
    lines = [
        f"{r['device']}, torch {r['torch']}, {st['model']} {st['image_size']} px, batch {st['batch_size']}, "
        f"precision {st['precision']}, channels_last {st['channels_last']}, compile {st['compile']}, "
        f"{st['workers']} workers, {st['steps']} steps after {st['warmup']}",
        "",
        "| feed | img/s | data wait | peak device memory |",
        "|---|---:|---:|---:|",
    ]
    for feed in FEEDS:
        rate, wait, mem = (r[k][feed] for k in ("img_per_s", "data_wait_frac", "peak_mem_bytes"))
        if rate is None:
            lines.append(f"| {feed} | skipped ({r['skipped'].get(feed, '')}) | | |")
            continue
        shown = "n/a (CPU)" if mem is None else f"{mem / 2**30:.2f} GiB"
        lines.append(f"| {feed} | {rate:,.0f} | {100 * wait:.1f} % | {shown} |")
    ratios = r["ratios"]
    vs_original = ratios["radstream_vs_original"]
    lines.append(
        f"\nradstream / model_only = {ratios['radstream_vs_model_only']:.2f}"
        + ("" if vs_original is None else f"; radstream / original = {vs_original:.2f}")
    )
    check = r["augment_check"]
    lines.append(
        f"augmentation alone (batch {check['batch_size']}, {check['image_size']} px): "
        + ", ".join(f"{w} {v:,.0f} img/s" for w, v in r["augment"].items())
        + f"; largest pixel difference {check['max_abs_diff']:.1e}"
    )
    if "acquisition" in r:
        lines.append(describe(r["acquisition"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, str | None]:
    """The settings, and where to write the JSON (None: nowhere)."""
    p = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--raw", default=None, help="raw PNG dataset folder, for the `original` feed (skipped without)")
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--image-size", type=int, default=299, help="training resolution (resized on the device)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="bf16" if cuda else "no")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compiled during the warmup)")
    p.add_argument("--workers", type=int, default=4, help="loader processes (radstream and original)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per feed")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each window")
    p.add_argument("--warp", choices=sorted(WARPS), default=DEFAULT_WARP, help="DeviceAugment's warp")
    p.add_argument("--augment-seconds", type=float, default=3.0, help="time spent timing each warp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    args = vars(p.parse_args(argv))
    out = args.pop("json")
    return Settings(**args), out


def main(argv: list[str] | None = None) -> int:
    settings, out = parse_args(argv)
    results = run(settings)
    print(table(results))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
