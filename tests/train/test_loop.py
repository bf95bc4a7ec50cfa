"""train.loop.train_one_epoch on a tiny model and an in-memory loader (no shards, one process)."""

from __future__ import annotations

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
