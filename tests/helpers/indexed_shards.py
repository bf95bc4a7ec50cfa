"""Tiny synthetic shard sets whose pixels encode the sample index, so tests know exactly what arrived.

A module of its own (not conftest.py) so that tests import it by a name no other test folder uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.provenance import Provenance
from sharding.contract import CLASSES
from sharding.dedup import phash, phash_hex, pixel_sha256
from sharding.manifest import Manifest, SplitInfo, write_manifest
from sharding.writer import encode_sample, write_shard

SIZE = 16  # small images keep the fixtures and tests fast; the readers take the size from the manifest

#: Samples per shard and split: odd totals, fewer val/test shards than 3 ranks.
LAYOUT = {"train": [7, 5, 6, 3], "val": [5, 2], "test": [3]}


def make_image(g: int, size: int = SIZE) -> np.ndarray:
    """uint8 [1, size, size]: pixel (0,0) and (0,1) hold the index; a gradient elsewhere."""
    img = ((np.arange(size * size).reshape(1, size, size) * 3 + g * 11) % 251).astype(np.uint8)
    img[0, 0, 0], img[0, 0, 1] = g % 256, g // 256
    return img


def image_index(img) -> int:
    img = np.asarray(img).reshape(-1, *np.asarray(img).shape[-2:])
    return int(img[0, 0, 0]) + 256 * int(img[0, 0, 1])


def make_mask(g: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((1, size, size), np.uint8)
    a = 2 + g % 3
    m[0, a : size - 3, a + 1 : size - 4] = 1
    return m


def key_of(g: int) -> str:
    return f"s{g:05d}"


def label_of(g: int) -> int:
    return g % len(CLASSES)


def provenance_of(g: int) -> Provenance:
    """What sample g's json says about its origin (three sources; made-up hashes that name g)."""
    return Provenance(f"site-{g % 3}", f"{g:064x}", g * 7919, f"in/{key_of(g)}.png")


def meta_of(g: int, split: str) -> dict:
    origin = provenance_of(g)
    return {
        "g": g,
        "split": split,
        "source": origin.source,
        "sha256": origin.sha256,
        "phash": f"{origin.phash:064x}",
        "path": origin.path,
    }


def true_meta(g: int, split: str, size: int = SIZE) -> dict:
    """`meta_of` with the real sha256 and pHash of sample g's pixels."""
    image = make_image(g, size)
    return {**meta_of(g, split), "sha256": pixel_sha256(image), "phash": phash_hex(phash(image[0]))}


def write_shards(
    out: Path,
    layout: dict[str, list[int]] = LAYOUT,
    *,
    encoding: str = "raw",
    masks: bool = True,
    size: int = SIZE,
    start: int = 0,
    classes: tuple[str, ...] = CLASSES,
    true_hashes: bool = False,
) -> Manifest:
    """Write `<split>-NNNNNN.tar` shards + manifest.json; sample ids run `start`.. across splits in order.

    Sample g has label g % len(classes), so another collection can have other classes in another order.
    `true_hashes`: each json holds its pixels' real sha256 and pHash (what `sharding verify` checks) instead
    of the made-up ones of `provenance_of`.
    """
    out.mkdir(parents=True, exist_ok=True)
    g = start
    splits = {}
    for split, counts in layout.items():
        infos = []
        for i, n in enumerate(counts):
            samples = []
            for _ in range(n):
                samples.append(
                    encode_sample(
                        key_of(g),
                        make_image(g, size),
                        g % len(classes),
                        true_meta(g, split, size) if true_hashes else meta_of(g, split),
                        encoding=encoding,
                        mask=make_mask(g, size) if masks else None,
                    )
                )
                g += 1
            infos.append(write_shard(out / f"{split}-{i:06d}.tar", samples))
        class_counts = tuple(sum(s.class_counts[c] for s in infos) for c in range(len(classes)))
        splits[split] = SplitInfo(shards=tuple(infos), class_counts=class_counts)
    manifest = Manifest(classes=tuple(classes), image_size=size, encoding=encoding, masks=masks, seed=0, splits=splits)
    write_manifest(manifest, out)
    return manifest


def split_ids(split: str, layout: dict[str, list[int]] = LAYOUT) -> set[int]:
    start = 0
    for name, counts in layout.items():
        if name == split:
            return set(range(start, start + sum(counts)))
        start += sum(counts)
    raise KeyError(split)
