"""The benchmark's timing helpers and its peers, LitData and MosaicML Streaming, at their best settings.

Each peer is written its own format from the same train samples and timed over a
small grid of the settings its documentation names for throughput (loader workers
including in-process, batch size, its decode and shuffle options); the best figure
is kept, with the settings that gave it (`python -m tools.bench_pipeline` puts them in
its JSON under `peer_settings`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch


def rate(iterator, batches: int, warmup: int) -> float:
    """Images/s over `batches` batches after `warmup` ones."""
    it = iter(iterator)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += batch_len(b)
    elapsed = time.perf_counter() - start
    return n / elapsed if elapsed > 0 and n else float("nan")


def batch_len(b) -> int:
    if hasattr(b, "keys") and isinstance(b.keys, list):
        return len(b.keys)
    if isinstance(b, dict):
        return len(next(iter(b.values())))
    if isinstance(b, (list, tuple)):
        return len(b[0])
    return len(b)


def cycle(make):
    """Endless iteration over epochs of a re-iterable."""
    while True:
        yield from make()


# --- (e) peers, each at its best documented settings ----------------------------------------
#
# Each peer is timed over a small grid of the settings its documentation names for
# throughput (loader workers including in-process, batch size, its decode and shuffle
# options) and the best figure is kept, with the settings that gave it in the JSON.


def _peer_grid(workers: int, batch_size: int) -> list[tuple[int, int]]:
    return [(w, b) for w in sorted({0, workers}) for b in sorted({64, batch_size})]


def _timed_and_dropped(make_loader, batches: int, warmup: int) -> float:
    """Rate of a fresh peer loader, whose workers are shut down here (not in a later fork's gc)."""
    holder = [make_loader()]
    it = cycle(lambda: holder[0])
    try:
        return rate(it, batches, warmup)
    finally:
        it.close()
        holder.clear()
        gc.collect()


def _best(trials) -> tuple[float, dict]:
    """(best img/s, its settings) over (settings, thunk returning img/s) pairs."""
    best: tuple[float, dict] = (float("nan"), {})
    for settings, run in trials:
        rate = run()
        if not best[1] or rate > best[0]:
            best = (rate, settings)
    return best


def _litdata_item(i):  # top-level so litdata's workers can pickle it
    images, labels = _LIT_SOURCE
    return {"image": images[i], "label": int(labels[i])}


_LIT_SOURCE: tuple[np.ndarray, np.ndarray] | None = None


def bench_litdata(images, labels, work: Path, batch_size, workers, batches, warmup) -> dict[bool, tuple[float, dict]]:
    """LitData: `StreamingDataset` over the optimized local folder (read in place, no cache copy),
    `batch_decode=0` (its documented per-item decode for large tensors: the default window decodes
    and drops ~75 neighbours per shuffled read), its default chunk + 256-item window shuffle."""
    import litdata

    global _LIT_SOURCE
    out = work / "litdata"
    if not (out / "index.json").exists():
        _LIT_SOURCE = (images, labels)
        litdata.optimize(
            fn=_litdata_item,
            inputs=list(range(len(labels))),
            output_dir=str(out),
            chunk_bytes="64MB",
            num_workers=1,
            verbose=False,
            start_method="fork",
        )

    def trial(shuffle, w, b):
        def make():
            ds = litdata.StreamingDataset(str(out), shuffle=shuffle, drop_last=True, batch_decode=0)
            return litdata.StreamingDataLoader(
                ds, batch_size=b, num_workers=w, drop_last=True, persistent_workers=w > 0
            )

        return _timed_and_dropped(make, max(2, batches * batch_size // b), warmup)

    return {
        shuffle: _best(
            (
                {
                    "num_workers": w,
                    "batch_size": b,
                    "batch_decode": 0,
                    "shuffle": "chunks + 256-item windows" if shuffle else "off",
                    "chunk_bytes": "64MB",
                },
                lambda w=w, b=b, shuffle=shuffle: trial(shuffle, w, b),
            )
            for w, b in _peer_grid(workers, batch_size)
        )
        for shuffle in (True, False)
    }


def bench_mosaic(images, labels, work: Path, batch_size, workers, batches, warmup) -> dict[bool, tuple[float, dict]]:
    """MosaicML Streaming: `StreamingDataset(local=...)` over MDS shards, its default `py1e` shuffle (the
    shuffle algorithms measured within noise of each other here), torch DataLoader."""
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    out = work / "mds"
    if not (out / "index.json").exists():
        shape = ",".join(str(d) for d in images.shape[1:])
        with MDSWriter(
            out=str(out), columns={"image": f"ndarray:uint8:{shape}", "label": "int"}, size_limit="64mb"
        ) as writer:
            for img, lab in zip(images, labels):
                writer.write({"image": img, "label": int(lab)})

    def trial(shuffle, w, b):
        def make():
            clean_stale_shared_memory()
            ds = StreamingDataset(local=str(out), shuffle=shuffle, batch_size=b, shuffle_seed=0, shuffle_algo="py1e")
            return torch.utils.data.DataLoader(
                ds, batch_size=b, num_workers=w, drop_last=True, persistent_workers=w > 0
            )

        return _timed_and_dropped(make, max(2, batches * batch_size // b), warmup)

    return {
        shuffle: _best(
            (
                {"num_workers": w, "batch_size": b, "shuffle_algo": "py1e" if shuffle else "off", "size_limit": "64mb"},
                lambda w=w, b=b, shuffle=shuffle: trial(shuffle, w, b),
            )
            for w, b in _peer_grid(workers, batch_size)
        )
        for shuffle in (True, False)
    }
