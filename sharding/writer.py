"""Encode samples in the shard contract and write byte-deterministic tar shards.

A shard is written under a temporary name in its final folder, fsynced, and
renamed into place, so a reader never sees a half-written tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from sharding.contract import CLASSES, LABEL, META, image_member, mask_member
from sharding.manifest import ShardInfo

#: Fixed tar metadata so the same samples give the same bytes on any machine.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a pax header to every member
TAR_USER = "radstream"
TAR_MODE = 0o444


def _add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """A sample's members `<key>.<ext>` in sorted order, with the fixed metadata.

    The same members, order and metadata as `webdataset.TarWriter(encoder=False, mtime=0)`, whose shards these
    have always been byte for byte (tested); written with `tarfile` alone so that a build's workers do not
    import webdataset, and with it torch (seconds per fresh worker process, e.g. a Ray worker)."""
    key = sample["__key__"]
    for ext in sorted(k for k in sample if not k.startswith("_")):
        value = sample[ext]
        data = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key}: member {ext} is {type(value).__name__}, not bytes")
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), TAR_MTIME, TAR_MODE, TAR_USER, TAR_USER
        tar.addfile(info, io.BytesIO(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.reshape(array.shape[-2:]), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_sample(
    key: str, image: np.ndarray, label: int, meta: dict, encoding: str = "raw", mask: np.ndarray | None = None
) -> dict[str, bytes | str]:
    """One WebDataset sample dict of bytes: image [H, W] or [1, H, W] uint8, label int."""
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    encode = _npy_bytes if encoding == "raw" else _png_bytes
    image = image.reshape(1, *image.shape[-2:])
    sample: dict[str, bytes | str] = {
        "__key__": key,
        image_member(encoding): encode(image),
        LABEL: str(int(label)).encode("ascii"),
        META: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    if mask is not None:
        sample[mask_member(encoding)] = encode(mask.reshape(1, *mask.shape[-2:]).astype(np.uint8))
    return sample


def write_shard(path: str | Path, samples: Iterable[dict], num_classes: int = len(CLASSES)) -> ShardInfo:
    """Write encoded samples to `path` atomically; returns its ShardInfo (count, sha256, bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    counts = [0] * num_classes
    n = 0
    try:
        with open(tmp, "wb") as fh:
            tar = tarfile.open(fileobj=fh, mode="w|")  # noqa: SIM115 - closed below, or abandoned on error
            try:
                for sample in samples:
                    _add_sample(tar, sample)
                    counts[int(sample[LABEL])] += 1
                    n += 1
                tar.close()
            except BaseException:
                # Abandon the tar (it is deleted below): without this, the "w|" stream's __del__ would try to
                # write the end-of-archive blocks into the closed file and print a traceback (tested).
                if hasattr(tar.fileobj, "closed"):  # the "w|" stream object
                    tar.fileobj.closed = True
                raise
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(name=path.name, samples=n, sha256=digest.hexdigest(), bytes=size, class_counts=tuple(counts))
