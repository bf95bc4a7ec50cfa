"""Fit the lung segmenter (`sharding.segmenter`) on shards that carry drawn lung masks.

    python -m train.lungs fit --shards shards/covid19 --out runs/lungs            # 128 px, up to 30 epochs
    python -m train.lungs fit --shards shards/demo --out runs/lungs --size 96 --epochs 8
    python -m train.lungs evaluate --model runs/lungs/lungs.safetensors --shards shards/external

`fit` trains on the train split (flip, rotation, zoom, shift and the acquisition transforms of
`pipeline.acquisition`, so the masks hold at machines it never saw), keeps the epoch with the best mean
validation Dice, stops after `--patience` epochs without one, and writes `lungs.safetensors` (weights, spec
and this card) and `lungs.json`: Dice and IoU on val and test with 95 % bootstrap intervals, at the films'
stored side, computed by the same function the build runs. Films whose drawn mask is empty are not
scored. One process (CUDA when there is one): the network is small. Then
`python -m sharding build --raw R --out S --lung-model runs/lungs/lungs.safetensors` gives a collection
without masks predicted ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.acquisition import AcquisitionRanges
from pipeline.augment import MEAN_1CH, STD_1CH, DeviceAugment
from pipeline.loader import build_loader, load_shard_manifest
from sharding import seeds
from sharding.files import atomic_write
from sharding.segmenter import (
    LungUNet,
    Segmenter,
    SegmenterError,
    SegmenterSpec,
    check_drawn_masks,
    save_segmenter,
    score_batches,
)

#: The training films' variation: the robust recipe's acquisition ranges plus zoom and shift, because a
#: segmenter must find lungs wherever a site places and scales them.
AUGMENT = AcquisitionRanges(
    gamma=0.4, contrast=0.3, brightness=0.1, blur=1.0, noise=0.04, resample=0.6, zoom=0.15, shift=0.08
)
WEIGHTS, CARD = "lungs.safetensors", "lungs.json"


@dataclass(frozen=True)
class FitOptions:
    """How `fit` trains (recorded in the card)."""

    size: int = 128  # the network's input side
    width: int = 16  # channels of the U-Net's first level
    epochs: int = 30  # at most
    patience: int = 5  # epochs without a better mean validation Dice before stopping
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    num_workers: int = 2

    def __post_init__(self) -> None:
        small = [k for k in ("epochs", "patience", "batch_size", "width") if getattr(self, k) < 1]
        if small or self.lr <= 0 or self.num_workers < 0:
            raise SegmenterError(f"need epochs, patience, batch size and width >= 1 and lr > 0, got {self}")


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice: the first trains every pixel, the second the lungs' overlap."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice).mean()


def train_one_epoch(model, loader, augment, optimizer, epoch: int, seed: int, device) -> dict:
    """One pass over the train split; {"loss", "films", "seconds", "data_s"}."""
    model.train()
    generator = torch.Generator(device=device)
    total, films, start, data_s = 0.0, 0, time.perf_counter(), 0.0
    loader.set_epoch(epoch)
    tick = time.perf_counter()
    for step, batch in enumerate(loader):
        data_s += time.perf_counter() - tick
        batch = batch.to(device, non_blocking=True)
        generator.manual_seed(seeds.derive(seed, epoch, 0, step, seeds.STEP_AUGMENT))
        images, masks = augment(batch.images, batch.masks, generator=generator)
        has_lungs = masks.flatten(1).amax(dim=1) > 0  # an empty drawn mask is a missing one: not a target
        if has_lungs.any():
            loss = loss_fn(model(images[has_lungs]), masks[has_lungs])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(has_lungs.sum())
            films += int(has_lungs.sum())
        tick = time.perf_counter()
    return {"loss": total / max(films, 1), "films": films, "seconds": time.perf_counter() - start, "data_s": data_s}


def fit(shards: str, out: Path, options: FitOptions, log=print) -> Path:
    """Train, keep the best validation epoch, write the weights file; returns its path."""
    check_drawn_masks(load_shard_manifest(shards), str(shards))
    torch.manual_seed(options.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SegmenterSpec(size=options.size, width=options.width, mean=MEAN_1CH, std=STD_1CH)
    model = LungUNet(spec.width, spec.depth).to(device)
    common = {"num_workers": options.num_workers, "seed": options.seed, "masks": True}
    train = build_loader(shards, "train", batch_size=options.batch_size, drop_last=True, **common)
    val = build_loader(shards, "val", batch_size=64, **common)
    augment = DeviceAugment(train=True, image_size=spec.size, channels_last=False, acquisition=AUGMENT)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    best, best_epoch, best_state = -1.0, -1, None
    for epoch in range(options.epochs):
        stats = train_one_epoch(model, train, augment, optimizer, epoch, options.seed, device)
        if not stats["films"]:
            raise SegmenterError(f"no film of {shards}'s train split has a drawn lung mask: nothing to learn from")
        scores = score_batches(Segmenter(model.cpu(), spec, ""), val)
        model.to(device)
        dice = float(scores.dice.mean()) if len(scores.dice) else 0.0
        log(
            f"epoch {epoch}: loss {stats['loss']:.4f}  val Dice {dice:.4f} ({len(scores.dice)} films)  "
            f"{stats['films'] / max(stats['seconds'], 1e-9):.0f} films/s, data wait {stats['data_s']:.1f} s"
        )
        if dice > best:
            best, best_epoch = dice, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= options.patience:
            log(f"no better validation Dice for {options.patience} epochs: stopping")
            break
    model.cpu().load_state_dict(best_state)
    card = {"options": asdict(options), "epoch": best_epoch, "val_dice": best, "shards": str(shards)}
    out.mkdir(parents=True, exist_ok=True)
    save_segmenter(model, spec, out / WEIGHTS, card)
    log(f"best epoch {best_epoch} (val Dice {best:.4f}): {out / WEIGHTS}")
    return out / WEIGHTS


def write_card(path: Path, report: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.lungs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train the segmenter on shards with drawn masks, then evaluate it")
    f.add_argument("--shards", required=True, help="shard folder built with --include-masks")
    f.add_argument("--out", required=True, type=Path, help="folder for lungs.safetensors and lungs.json")
    for name, default in asdict(FitOptions()).items():
        f.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    e = sub.add_parser("evaluate", help="Dice and IoU with intervals of a segmenter on shards with drawn masks")
    e.add_argument("--model", required=True, type=Path)
    e.add_argument("--shards", required=True)
    e.add_argument("--splits", default="val,test", help="comma-separated; all: every split as one")
    e.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from evaluation.segmentation import evaluate_segmenter, table

    try:
        if args.command == "fit":
            fields = asdict(FitOptions()).keys()
            path = fit(args.shards, args.out, FitOptions(**{k: getattr(args, k) for k in fields}))
            report = evaluate_segmenter(path, args.shards, ("val", "test"))
            write_card(args.out / CARD, report)
        else:
            report = evaluate_segmenter(args.model, args.shards, tuple(args.splits.split(",")))
            if args.json:
                write_card(args.json, report)
    except (SegmenterError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
