"""Run by each rank under `accelerate launch --multi_gpu --num_processes 2` (see test_pipeline_multiproc.py).

Each rank builds its loaders from the rank/world size accelerate puts in the
environment, counts train batches for two epochs, collects its val/test keys,
and the ranks exchange them with one all_gather_object (gloo) at the end;
rank 0 writes the JSON the test checks.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from accelerate import PartialState

from pipeline.loader import build_loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    # Without cpu=True on a machine with no CUDA, accelerate 1.x reports DistributedType.NO and
    # process_index 0 on *both* ranks under `--multi_gpu`; cpu=True gives MULTI_CPU over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    assert state.num_processes == dist.get_world_size(), (state.distributed_type, dist.get_world_size())
    rank, world = state.process_index, state.num_processes
    result = {"rank": rank, "world_size": world, "backend": str(state.backend)}
    train = build_loader(
        args.shards, "train", batch_size=4, rank=rank, world_size=world, num_workers=args.workers, shuffle_buffer=8
    )
    counts, sizes, train_keys = [], set(), []
    for epoch in range(2):
        train.set_epoch(epoch)
        n, keys = 0, []
        for batch in train:
            n += 1
            sizes.add(len(batch))
            keys.append(list(batch.keys))
        counts.append(n)
        train_keys.append(keys)
    result.update(
        train_counts=counts, steps_per_epoch=train.steps_per_epoch, batch_sizes=sorted(sizes), train_keys=train_keys
    )
    for split in ("val", "test"):
        loader = build_loader(args.shards, split, batch_size=2, rank=rank, world_size=world, num_workers=args.workers)
        result[f"{split}_keys"] = [k for b in loader for k in b.keys]
        result[f"{split}_steps"] = [loader.steps_per_epoch, sum(1 for _ in loader)]
    gathered = [None] * world
    dist.all_gather_object(gathered, result)  # one collective, after all loops
    if state.is_main_process:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh, indent=1)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
