"""train.loop.train_one_epoch on a tiny model and an in-memory loader (no shards, one process)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from pipeline.batch import Batch
from train.loop import EpochSpec, train_one_epoch


class CountingLoader:
    """Yields `n` fixed batches and counts how many were pulled."""

    def __init__(self, n: int):
        self.n, self.pulled = n, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            self.pulled += 1
            images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=gen)
            yield Batch(images=images, labels=torch.tensor([0, 1, 2, 3]), keys=["a", "b", "c", "d"], masks=None)


def test_a_capped_epoch_pulls_and_counts_exactly_the_cap():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = CountingLoader(10)
    result = train_one_epoch(
        model,
        optimizer,
        loader,
        lambda x, m, generator=None: (x.float() / 255, m),
        torch.nn.functional.cross_entropy,
        accelerator,
        EpochSpec(epoch=0, steps=3, seed=0),
        progress=False,
    )
    assert loader.pulled == 3 and result.rank_steps == [3] and result.images == 12


def test_the_train_loader_reads_masks_only_for_mask_lungs(phantom_shards):
    """Masks the step does not use are neither read, copied to the device, nor warped (half the bytes)."""
    from pipeline.collection import open_collections
    from pipeline.loader import LoaderError, build_loader
    from train.config import load_config
    from train.trainer import build_loaders

    data = open_collections(str(phantom_shards))
    assert data.masks
    for mask_lungs in (False, True):
        cfg = load_config(
            None,
            [f"data.shards={phantom_shards}", "data.num_workers=0", "train.batch_size=4", "eval.batch_size=4"]
            + [f"data.mask_lungs={str(mask_lungs).lower()}"],
        )
        loaders = build_loaders(cfg, data, Accelerator(cpu=True))
        train, val = (next(iter(loaders[s])) for s in ("train", "val"))
        assert (train.masks is not None) is mask_lungs
        # validation neither: masks would double its shared-memory ring (the report's loaders read their own)
        assert (val.masks is not None) is mask_lungs
    no_masks = build_loader(phantom_shards, "train", batch_size=4, num_workers=0, masks=False)
    assert next(iter(no_masks)).masks is None
    with pytest.raises(LoaderError, match="no masks"):
        build_loader(
            phantom_shards,
            "train",
            batch_size=4,
            num_workers=0,
            masks=True,
            manifest=replace(data.manifest, masks=False),
        )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_predict_split_runs_in_eval_mode_and_leaves_the_mode_as_it_came(mode):
    from train.predictions import predict_split

    accelerator = Accelerator(cpu=True)
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train(mode == "train")
    before = model[1].running_mean.clone()
    batches = [replace(b, keys=[f"{k}{i}" for k in b.keys]) for i, b in enumerate(CountingLoader(2))]
    preds = predict_split(model, batches, lambda x, m: (x.float() / 255, m), accelerator)
    assert seen == [False, False] and model.training is (mode == "train")
    assert torch.equal(model[1].running_mean, before), "eval-mode BatchNorm keeps its running statistics"
    assert len(preds.keys) == 8 and preds.probs.shape == (8, 4)
