"""Check a shard set against its manifest: hashes, counts, and every sample's decoded contents.

Uses only `tarfile`, NumPy and Pillow, i.e. exactly what the README promises a
reader needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sharding.contract import LABEL, META, image_member, mask_member
from sharding.dedup import phash, phash_hex
from sharding.manifest import Manifest, ShardInfo, load_manifest, shards_root


@dataclass
class VerifyResult:
    """Problems found, each naming its shard; `ok` when there are none."""

    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def decode_member(name: str, data: bytes) -> np.ndarray:
    """Decode an image or mask member (`.npy` or `.png`) to uint8 [1, H, W]."""
    if name.endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    elif name.endswith(".png"):
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "L":
                raise ValueError(f"PNG mode {img.mode}, expected L")
            arr = np.asarray(img)[None]
    else:
        raise ValueError(f"unknown member type {name!r}")
    return arr


def iter_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Samples of a tar as {"__key__": key, ext: bytes}, in order, with tarfile alone."""
    current: dict | None = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_shard(root: Path, split: str, shard: ShardInfo, manifest: Manifest, keys: set[str]) -> list[str]:
    path = root / shard.name
    where = f"{split}/{shard.name}"
    if not path.is_file():
        return [f"{where}: missing"]
    if path.stat().st_size != shard.bytes:
        return [f"{where}: size {path.stat().st_size} bytes, manifest says {shard.bytes}"]
    if sha256_file(path) != shard.sha256:
        return [f"{where}: sha256 does not match the manifest (corrupted or replaced)"]
    problems: list[str] = []
    size = manifest.image_size
    img_ext, mask_ext = image_member(manifest.encoding), mask_member(manifest.encoding)
    counts = [0] * len(manifest.classes)
    n = 0
    try:
        for sample in iter_samples(path):
            key = sample["__key__"]
            n += 1
            if key in keys:
                problems.append(f"{where}: duplicate key {key}")
            keys.add(key)
            expected = {img_ext, LABEL, META} | ({mask_ext} if manifest.masks else set())
            if set(sample) - {"__key__"} != expected:
                problems.append(
                    f"{where}: sample {key} has members {sorted(set(sample) - {'__key__'})}, "
                    f"expected {sorted(expected)}"
                )
                continue
            label = int(sample[LABEL].decode("ascii"))
            if not 0 <= label < len(manifest.classes):
                problems.append(f"{where}: sample {key} label {label} out of range")
                continue
            counts[label] += 1
            meta = json.loads(sample[META].decode("utf-8"))
            if meta.get("split") != split:
                problems.append(f"{where}: sample {key} json says split {meta.get('split')!r}")
            for ext in [img_ext] + ([mask_ext] if manifest.masks else []):
                arr = decode_member(ext, sample[ext])
                if arr.dtype != np.uint8 or arr.shape != (1, size, size):
                    problems.append(
                        f"{where}: sample {key} {ext} is {arr.dtype}{list(arr.shape)}, "
                        f"expected uint8[1, {size}, {size}]"
                    )
                elif ext == mask_ext and arr.max(initial=0) > 1:
                    problems.append(f"{where}: sample {key} mask has values above 1")
                elif ext == img_ext and hashlib.sha256(arr.tobytes()).hexdigest() != meta.get("sha256"):
                    problems.append(f"{where}: sample {key} pixels do not match their sha256")
                elif ext == img_ext and "phash" in meta and meta["phash"] != phash_hex(phash(arr[0])):
                    problems.append(f"{where}: sample {key} pixels do not match their phash")
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad shard
        problems.append(f"{where}: cannot read: {type(exc).__name__}: {exc}")
        return problems
    if n != shard.samples:
        problems.append(f"{where}: {n} samples, manifest says {shard.samples}")
    if shard.class_counts and tuple(counts) != tuple(shard.class_counts):
        problems.append(f"{where}: class counts {counts}, manifest says {list(shard.class_counts)}")
    return problems


def verify(shards: str | Path) -> VerifyResult:
    """Re-hash every shard and decode every sample; ManifestError if the manifest is unusable."""
    manifest = load_manifest(shards)
    root = shards_root(shards)
    result = VerifyResult()
    keys: set[str] = set()
    for split, info in manifest.splits.items():
        for shard in info.shards:
            result.problems.extend(_check_shard(root, split, shard, manifest, keys))
            result.shards += 1
            result.samples += shard.samples
        totals = [sum(s.class_counts[c] for s in info.shards if s.class_counts) for c in range(len(manifest.classes))]
        if info.shards and all(s.class_counts for s in info.shards) and tuple(totals) != tuple(info.class_counts):
            result.problems.append(f"split {split}: class counts {list(info.class_counts)} != sum of its shards")
    written = manifest.counts.get("written")
    if written is not None and written != result.samples:
        result.problems.append(f"manifest counts say {written} written, shards hold {result.samples}")
    return result
