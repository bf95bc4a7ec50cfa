"""One shard stream -> validated `Sample`s: the fast raw path (`pipeline.fast_tar`) or the generic path.

The generic path is webdataset's tar iterator + `group_by_keys`, then a decode per
member (png through PIL, npy through numpy); it serves png shards and `fast=False`.
Both paths keep the same contract: well-formed samples or `ShardFormatError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from pipeline import provenance
from pipeline.fast_tar import Sample, ShardFormatError, _label, map_file, raw_samples
from sharding.contract import IMAGE_PNG, IMAGE_RAW, LABEL, MASK_PNG, MASK_RAW, META


def _decode_image(data: bytes, ext: str, key: str, image_size: int) -> np.ndarray:
    shape = (1, image_size, image_size)
    try:
        if ext.endswith("npy"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in ("L", "P", "1"):
                    raise ShardFormatError(f"sample {key!r}: {ext} has mode {img.mode}, expected L")
                array = np.asarray(img.convert("L") if img.mode != "L" else img)
    except ShardFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a format error
        raise ShardFormatError(f"sample {key!r}: cannot decode {ext}: {exc}") from None
    if array.dtype != np.uint8 or array.size != image_size * image_size or array.ndim not in (2, 3):
        raise ShardFormatError(
            f"sample {key!r}: {ext} is {array.dtype} {list(array.shape)}, expected uint8 {list(shape)}"
        )
    return array.reshape(shape)


def generic_samples(
    stream: BinaryIO, *, encoding: str, image_size: int, num_classes: int, masks: bool
) -> Iterator[Sample]:
    """Generic path: webdataset's tar iterator + group_by_keys, then per-sample decode (png or npy)."""
    import tarfile

    from webdataset import tariterators

    image_ext = IMAGE_RAW if encoding == "raw" else IMAGE_PNG
    mask_ext = MASK_RAW if encoding == "raw" else MASK_PNG
    try:
        members = tariterators.tar_file_expander([{"url": "shard", "stream": stream}])
        for raw in tariterators.group_by_keys(members):
            key = raw.get("__key__")
            if image_ext not in raw or LABEL not in raw:
                raise ShardFormatError(f"sample {key!r} lacks {image_ext} or {LABEL}")
            if masks and mask_ext not in raw:
                raise ShardFormatError(f"sample {key!r} lacks {mask_ext} (manifest says masks)")
            image = _decode_image(raw[image_ext], image_ext, key, image_size)
            mask = _decode_image(raw[mask_ext], mask_ext, key, image_size) if masks else None
            origin = provenance.from_json(raw[META]) if META in raw else provenance.NONE
            yield Sample(key, _label(raw[LABEL], key, num_classes), image, mask, origin)
    except ShardFormatError:
        raise
    except (tarfile.TarError, ValueError, KeyError, OSError, EOFError) as exc:
        raise ShardFormatError(f"unreadable tar: {type(exc).__name__}: {exc}") from None


def read_samples(
    stream: BinaryIO, *, encoding: str, image_size: int, num_classes: int, masks: bool, fast: bool = True
) -> Iterator[Sample]:
    """Samples of one shard stream: the fast path for raw shards, else the generic path."""
    if fast and encoding == "raw":
        mapped = map_file(stream)
        return raw_samples(
            mapped if mapped is not None else stream, image_size=image_size, num_classes=num_classes, masks=masks
        )
    return generic_samples(stream, encoding=encoding, image_size=image_size, num_classes=num_classes, masks=masks)


__all__ = ["generic_samples", "read_samples"]
