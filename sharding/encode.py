"""Per-sample work of a build, run in the worker processes: pass 1 (`analyse_one`) and pass 2 (`write_shard_task`).

Pass 1 decodes and preprocesses an image and returns only facts (pixel sha256,
perceptual hash, original size/mode, mask problem): no pixels cross processes.
Pass 2 preprocesses each sample of a shard again, checks it against pass 1,
encodes it and appends it to the shard, all inside the worker.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sharding.contract import IMAGE_SIZE
from sharding.dedup import phash, phash_hex, pixel_sha256
from sharding.pool import tick
from sharding.preprocess import PreprocessError, load_image, load_mask, open_image
from sharding.source import Record

#: Relative aspect-ratio difference above which a mask does not belong to its image.
MASK_ASPECT_TOLERANCE = 0.02
#: The mask problem of a film that comes without a mask: the one a segmenter fills (`--lung-model`); a drawn
#: mask that is unreadable or does not fit is a problem to fix, not to paper over.
NO_MASK = "no mask file"


class SampleError(ValueError):
    """An input changed or became unreadable between the two passes; the message names it."""


def _mask_problem(rec: Record, size: tuple[int, int]) -> str | None:
    """Why this record's mask cannot be used, or None."""
    if rec.mask_path is None:
        return NO_MASK
    try:
        mask = open_image(rec.mask_path)
    except PreprocessError as exc:
        return f"mask {_reason(exc)}"
    except OSError as exc:
        return f"mask unreadable: {_reason(exc)}"
    w, h = size
    ratio_img, ratio_mask = w / h, mask.width / mask.height
    if abs(ratio_mask / ratio_img - 1.0) > MASK_ASPECT_TOLERANCE:
        return f"mask is {mask.width}x{mask.height}, its image {w}x{h}: aspect ratios differ"
    return None


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """The message of an error, without object addresses (the manifest must be deterministic)."""
    return _ADDRESS.sub("the file", str(exc))


def analyse_one(rec: Record, include_masks: bool, want_phash: bool) -> dict:
    """Pass 1 for one image: pixel sha256, perceptual hash, original size/mode, mask problem; no pixels kept."""
    try:
        pixels, info = load_image(rec.path)
    except PreprocessError as exc:
        return {"error": _reason(exc)}
    except OSError as exc:
        return {"error": f"cannot read file: {_reason(exc)}"}
    out = {"sha": pixel_sha256(pixels), "size": [info.width, info.height], "mode": info.mode}
    if info.meta:
        out["dicom"] = info.meta
    if want_phash:
        out["phash"] = phash(pixels)
    if include_masks:
        out["mask_issue"] = _mask_problem(rec, (info.width, info.height))
    return out


def sample_meta(rec: Record, fact: dict) -> dict:
    """The sample json's provenance fields: source, patient_id and DICOM header fields, when known."""
    meta: dict = {"source": rec.source}
    dicom = fact.get("dicom") or {}
    patient = rec.patient_id or dicom.get("patient_id")
    if patient:
        meta["patient_id"] = str(patient)
    meta.update({k: v for k, v in dicom.items() if k != "patient_id" and v not in (None, "")})
    return meta


@dataclass(frozen=True)
class SampleTask:
    """One sample to preprocess again, check against pass 1 and encode."""

    record: Record
    split: str
    sha256: str  # pixel digest from pass 1: a file changed since is an error, not a different sample
    orig_size: list[int]
    orig_mode: str
    encoding: str
    masks: bool
    mask_issue: str | None
    meta: dict | None = None  # source, patient_id and DICOM header fields for the sample json


@functools.lru_cache(maxsize=2)
def _segmenter(path: str, sha256: str):
    """The build's segmenter, loaded once per worker process, on one thread (a forked worker must not enter the
    parent's torch thread pool), and checked against the digest the driver read."""
    from sharding.segmenter import SegmenterError, load_segmenter, torch_threads

    try:
        with torch_threads(1):
            return load_segmenter(path, sha256)
    except SegmenterError as exc:
        raise SampleError(
            f"a build worker cannot load the lung model: {exc}; put the file the build started with back at "
            f"{path} (on every Ray node) and run the build again"
        ) from None


def _encode(task: SampleTask, lung: tuple[str, str] | None = None) -> dict:
    rec = task.record
    try:
        pixels, _ = load_image(rec.path)
    except (PreprocessError, OSError) as exc:
        raise SampleError(f"{rec.rel} became unreadable during the build: {exc}") from None
    sha = pixel_sha256(pixels)
    if sha != task.sha256:
        raise SampleError(f"{rec.rel} changed during the build; run it again")
    meta = {
        "path": rec.rel,
        "class": rec.class_name,
        **(task.meta or {"source": rec.source}),
        "orig_size": task.orig_size,
        "orig_mode": task.orig_mode,
        "sha256": sha,
        "phash": phash_hex(phash(pixels)),
        "split": task.split,
    }
    mask = None
    if task.masks:
        if task.mask_issue is None:
            try:
                mask = load_mask(rec.mask_path)
            except (PreprocessError, OSError) as exc:
                raise SampleError(f"mask of {rec.rel} became unreadable during the build: {exc}") from None
        elif lung is not None and task.mask_issue == NO_MASK:  # a film without a mask gets the segmenter's
            mask = _segmenter(*lung).predict(pixels)
            meta["mask_predicted_by"] = lung[1]
        else:
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        meta["mask_missing"] = "mask_predicted_by" not in meta and task.mask_issue is not None
    from sharding.writer import encode_sample

    return encode_sample(rec.key, pixels, rec.label, meta, task.encoding, mask)


@dataclass(frozen=True)
class ShardTask:
    """One shard to write, in a worker: no pixels cross processes."""

    path: str
    split: str
    samples: tuple[SampleTask, ...]
    num_classes: int
    delay_s: float = 0.0  # a pause after the shard: a fault test's window to kill a build mid-way
    lung_model: tuple[str, str] | None = None  # (path, sha256) of the segmenter for films without a mask


def write_shard_task(task: ShardTask) -> object:
    from sharding.writer import write_shard

    def samples() -> Iterator[dict]:
        for t in task.samples:
            yield _encode(t, task.lung_model)
            tick()

    info = write_shard(task.path, samples(), task.num_classes)
    if task.delay_s:
        time.sleep(task.delay_s)
    return info
