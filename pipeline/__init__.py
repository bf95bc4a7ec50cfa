"""Shard URLs -> augmented, normalised batches on the training device.

Host side (`pipeline.loader.build_loader`): uint8 `Batch`es per rank with exact
multi-rank semantics; device side (`pipeline.augment.DeviceAugment`): flip +
rotation in one warp, 1-channel ImageNet normalisation, channels_last.

    loader = build_loader(shards, "train", batch_size=64, rank=acc.process_index,
                          world_size=acc.num_processes, num_workers=2, seed=cfg.seed,
                          pin_memory=True)
    augment = DeviceAugment(train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:                     # exactly len(loader) batches on every rank
            batch = batch.to(acc.device, non_blocking=True)
            images, _ = augment(batch.images)    # float32, normalised, channels_last
"""

from pipeline.batch import Batch

__all__ = [
    "Batch",
    "CorruptReport",
    "DeviceAugment",
    "LoaderStateError",
    "MEAN_1CH",
    "STD_1CH",
    "ShardFormatError",
    "ShardLoader",
    "build_loader",
    "load_shard_manifest",
]


def __getattr__(name: str):  # lazy: importing pipeline does not pull in kornia/webdataset
    if name in ("build_loader", "load_shard_manifest", "ShardLoader", "LoaderStateError"):
        from pipeline import loader

        return getattr(loader, name)
    if name == "CorruptReport":
        from pipeline.read import CorruptReport

        return CorruptReport
    if name in ("DeviceAugment", "MEAN_1CH", "STD_1CH"):
        from pipeline import augment

        return getattr(augment, name)
    if name == "ShardFormatError":
        from pipeline.fast_tar import ShardFormatError

        return ShardFormatError
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
