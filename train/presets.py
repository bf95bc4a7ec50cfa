"""What a batch goes through before the model, for training, evaluation and prediction: one home.

Like torchvision references' `presets.py` beside `train.py`: the entry script,
`evaluation.run` and `evaluation.predict` all take their loaders and device
transforms from here, so an image is prepared the same way everywhere.
"""

from __future__ import annotations

from pipeline.augment import DeviceAugment
from pipeline.collection import CollectionSet
from pipeline.loader import ShardLoader, build_loader
from sharding.manifest import Manifest
from train.config import Config, acquisition_ranges


def build_augment(cfg: Config, train: bool) -> DeviceAugment:
    """The device transform of a run: the lung crop; when `train`, flips, rotations and the acquisition
    augmentation; resize, masking, normalisation."""
    return DeviceAugment(
        train=train,
        rotation_degrees=cfg.data.rotation_degrees,
        hflip_p=cfg.data.hflip_p,
        image_size=cfg.data.image_size,
        mask_lungs=cfg.data.mask_lungs,
        channels_last=cfg.model.channels_last,
        warp=cfg.data.warp,
        acquisition=acquisition_ranges(cfg),
        crop=cfg.data.crop,
        crop_margin=cfg.data.crop_margin,
        warp_at=cfg.data.warp_at,
    )


def masks_used(cfg: Config) -> bool | None:
    """`masks` for the train and val loaders: training and validation use masks only for `data.mask_lungs`,
    so without it they stay unread (half the bytes to read, to hold in the shared-memory ring, to copy to
    the device and to warp); None yields them when present."""
    return None if cfg.data.mask_lungs or cfg.data.crop == "lungs" else False


def build_split_loader(
    cfg: Config,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    manifest: Manifest | None = None,
    shards: str | list | None = None,
    collections: CollectionSet | None = None,
    num_workers: int | None = None,
    masks: bool | None = None,
    train: bool | None = None,
) -> ShardLoader:
    """This rank's loader of `split`; not passed to `accelerator.prepare` (see pipeline.loader).

    `masks=False` leaves the shards' masks unread (`build_loader`); None yields them when present.
    `train=False` reads the train split once in evaluation order (external tests over every film).
    `collections` (opened once by the caller) or `shards` override the config's `data.shards`.
    """
    train_order = split == "train" if train is None else train
    return build_loader(
        collections or shards or cfg.data.shards,
        split,
        batch_size=cfg.train.batch_size if train_order else cfg.eval.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        drop_last=cfg.data.drop_last,
        cache_dir=cfg.data.cache_dir,
        strict=cfg.data.strict,
        verify_checksums=cfg.data.verify_checksums,
        pin_memory=pin_memory,
        manifest=manifest,
        masks=masks,
        train=train_order,
        shared_memory=cfg.data.shared_memory,
        balance=cfg.data.balance,
        epoch_samples=cfg.data.epoch_samples,
        classes=cfg.data.classes,
    )
