"""Reading shards: the manifest, the offset index of local raw shards, segment reads, the corrupt-shard policy.

- `load_shard_manifest(shards)`: the one manifest loader, for folders, `file:` and remote prefixes.
- `build_index(...)`: local raw shards walked (and hashed against the manifest) once per
  loader into an offset index; workers then take each sample straight from an mmap.
- `localize(...)`: remote shards downloaded into `cache_dir` (verified, atomic), so that
  a cached shard set reads like a local one.
- `read_segment(...)`: samples [lo, hi) of one shard read front to back (any URL, raw or
  png), with the corrupt-shard policy: train skips a bad shard (warned, counted in a
  `CorruptCounter`; `strict` raises), eval always raises `ShardFormatError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.fast_tar import Sample, ShardFormatError, index_samples, map_file
from pipeline.provenance import Provenance
from pipeline.samples import read_samples
from pipeline.urls import cache_path, is_remote, join_url, local_path, open_url
from sharding.manifest import Manifest, ManifestError, load_manifest


def load_shard_manifest(shards: str | Path) -> Manifest:
    """The manifest of a shard set at a folder, `file:` URL or remote prefix (http(s), gs, s3)."""
    path = local_path(str(shards))
    if path is not None:
        return load_manifest(path)
    url = join_url(shards, "manifest.json")
    try:
        with open_url(url) as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from None
    return Manifest.from_dict(data)


@dataclass(frozen=True)
class ShardRef:
    """A shard's location and the sha256 its bytes must have: one cache key per shard, whoever reads it.

    Every reader of a remote shard (the loader, and evaluation's metadata reads) opens it with the
    same (url, sha256), so `data.cache_dir` holds one copy of it, verified once.
    """

    url: str
    sha256: str | None = None
    samples: int = 0  # how many samples the manifest lists in it
    collection: str = ""  # in a mixed set, the collection whose name qualifies its films' keys (`name/key`)

    def film_key(self, key: str) -> str:
        """A film's key as a mixed set names it (`pipeline.collection.qualified`)."""
        return f"{self.collection}/{key}" if self.collection else key

    def shard_key(self, film_key: str) -> str:
        """The key inside the shard of a film named `film_key`."""
        return film_key[len(self.collection) + 1 :] if self.collection else film_key

    def open(self, cache_dir: str | None = None, allow_pipe: bool | None = None):
        return open_url(self.url, cache_dir=cache_dir, allow_pipe=allow_pipe, sha256=self.sha256)


def split_shards(manifest: Manifest, shards: str | Path, split: str, verify: bool = True) -> list[ShardRef]:
    """The shards of `split` under `shards` (folder or URL prefix), with their digests when `verify` (as the
    loader's `verify_checksums`, so both use the same cache key)."""
    base = local_path(str(shards))
    urls = manifest.shard_urls(split, str(base) if base is not None else str(shards))
    return [ShardRef(u, s.sha256 if verify else None, s.samples) for u, s in zip(urls, manifest.split(split).shards)]


def split_digest(manifest: Manifest, split: str) -> str:
    """A short digest of one split's shards (names, counts, sha256): what a loader state belongs to."""
    info = manifest.split(split)
    text = json.dumps([[s.name, s.samples, s.sha256] for s in info.shards])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class NoReadableSamplesError(RuntimeError):
    """Every train shard is corrupt or unreachable: there is nothing to train on."""


def no_readable_samples(shards: int) -> NoReadableSamplesError:
    return NoReadableSamplesError(
        f"no readable train samples: all {shards} train shards are corrupt or unreachable (see the warnings "
        "above; `python -m sharding verify` checks them)"
    )


@dataclass(frozen=True)
class ReadSpec:
    """How to read and validate a split's shards (picklable, handed to workers)."""

    encoding: str
    image_size: int
    num_classes: int
    masks: bool
    train: bool
    strict: bool = False
    fast: bool = True
    cache_dir: str | None = None
    allow_pipe: bool | None = None


@dataclass
class CorruptReport:
    """Corrupt shards skipped in train streams so far (all epochs, all workers)."""

    shards: int = 0
    samples_lost: int = 0  # samples planned from the shard but not read
    events: list[tuple[str, str]] = field(default_factory=list)  # (url, reason), the first MAX_EVENTS


class CorruptCounter:
    """Counts shared with worker processes (multiprocessing Values + an event queue)."""

    #: Events kept for the report. The queue is a pipe that nobody may read for a whole run:
    #: unbounded, a bad shard met every epoch would fill it and block the next `add` for good.
    MAX_EVENTS = 100

    def __init__(self) -> None:
        ctx = mp.get_context()
        self.shards = ctx.Value("q", 0)
        self.samples = ctx.Value("q", 0)
        self.queue = ctx.SimpleQueue()
        self.events: list[tuple[str, str]] = []

    def add(self, url: str, lost: int, reason: str) -> None:
        with self.shards.get_lock():
            self.shards.value += 1
            keep = self.shards.value <= self.MAX_EVENTS
        with self.samples.get_lock():
            self.samples.value += max(0, lost)
        if keep:
            self.queue.put((url, reason))

    def report(self) -> CorruptReport:
        while not self.queue.empty():
            self.events.append(self.queue.get())
        return CorruptReport(self.shards.value, self.samples.value, list(self.events))


def skip_or_raise(spec: ReadSpec, counter: CorruptCounter | None, url: str, lost: int, exc: Exception) -> None:
    """The corrupt-shard policy: eval and strict raise naming the shard; train warns and counts."""
    if not spec.train or spec.strict:
        raise ShardFormatError(f"shard {url}: {exc}") from exc
    reason = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"skipping corrupt shard {url} ({lost} samples lost): {reason}", RuntimeWarning, stacklevel=3)
    if counter is not None:
        counter.add(url, lost, reason)


# --------------------------------------------------------------------------- offset index (random access)


@dataclass
class ShardIndex:
    """A local raw shard validated once (checksum, npy headers, labels): sample offsets, or the error."""

    path: str
    size: int
    mtime_ns: int
    keys: list[str] | None = None
    labels: np.ndarray | None = None  # int64 [n]
    image_offsets: np.ndarray | None = None  # int64 [n], byte offset of each image's pixels
    mask_offsets: np.ndarray | None = None  # int64 [n], -1 without masks
    provenance: list[Provenance] | None = None  # each sample's json: source, pixel sha256, pHash, path
    error: str | None = None

    def stale(self) -> bool:
        """True when the file's size or mtime changed since it was indexed."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)


def index_shard(path: str, spec: ReadSpec, count: int, sha256: str | None) -> ShardIndex:
    """Walk (and hash, with `sha256`) one local raw shard; errors are recorded, not raised."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ShardIndex(path, -1, -1, error=f"{type(exc).__name__}: {exc}")
    try:
        with open(path, "rb") as fh:
            mapped = map_file(fh)
        if mapped is None:
            raise ShardFormatError("empty or not a regular file")
        # not closed here: the walk's memoryviews may still be alive in a traceback; gc unmaps it
        if sha256 is not None and hashlib.sha256(mapped).hexdigest() != sha256:
            raise ShardFormatError(
                "sha256 differs from the manifest's (bit rot or an edited shard; "
                "`python -m sharding verify` lists every damaged shard, a rebuild with "
                "--force restores them)"
            )
        entries = index_samples(mapped, image_size=spec.image_size, num_classes=spec.num_classes, masks=spec.masks)
        if len(entries) != count:
            raise ShardFormatError(f"holds {len(entries)} samples, the manifest says {count}")
    except (ShardFormatError, OSError) as exc:
        return ShardIndex(path, st.st_size, st.st_mtime_ns, error=f"{type(exc).__name__}: {exc}")
    keys, labels, images, masks, origins = zip(*entries) if entries else ((), (), (), (), ())
    return ShardIndex(
        path,
        st.st_size,
        st.st_mtime_ns,
        list(keys),
        np.array(labels, np.int64),
        np.array(images, np.int64),
        np.array(masks, np.int64),
        list(origins),
    )


def build_index(
    paths: list[str],
    spec: ReadSpec,
    counts: list[int],
    sha256: list[str] | None,
    previous: list[ShardIndex] | None = None,
) -> list[ShardIndex]:
    """Index every shard once; a shard indexed before is walked again only if its size or mtime changed.

    With `sha256` each shard is hashed against the manifest (about 1 s per GB, once
    per loader): a flipped pixel or label digit is a valid tar to any reader, and
    only the digest tells it from the data that was built.
    """
    out = []
    for i, path in enumerate(paths):
        old = previous[i] if previous is not None else None
        if old is not None and old.path == path and not old.stale():
            out.append(old)
        else:
            out.append(index_shard(path, spec, counts[i], sha256[i] if sha256 else None))
    return out


def localize(urls: list[str], spec: ReadSpec, sha256: list[str] | None) -> tuple[list[str], dict[int, str]]:
    """Local paths of `urls`, downloading remote ones into `spec.cache_dir` first.

    Returns (paths, failures): a shard that cannot be downloaded (or whose download
    fails its sha256) has no path ('') and its reason in `failures`.
    """
    paths, failures = [], {}
    for i, url in enumerate(urls):
        path = local_path(url)
        if path is not None:
            paths.append(str(path))
            continue
        digest = sha256[i] if sha256 else None
        try:
            open_url(url, cache_dir=spec.cache_dir, allow_pipe=spec.allow_pipe, sha256=digest).close()
            paths.append(str(cache_path(url, spec.cache_dir, digest)))
        except PermissionError:
            raise  # secure mode refusing a pipe: a configuration error, never a skippable shard
        except (ShardFormatError, OSError) as exc:
            paths.append("")
            failures[i] = f"{type(exc).__name__}: {exc}"
    return paths, failures


def random_access(urls: list[str], spec: ReadSpec) -> bool:
    """Whether the global plan applies: raw shards on the fast path, each local or cached."""
    return (
        spec.fast
        and spec.encoding == "raw"
        and all(local_path(u) is not None or (spec.cache_dir is not None and is_remote(u)) for u in urls)
    )


# --------------------------------------------------------------------------- sequential reads


def read_segment(
    spec: ReadSpec, url: str, count: int, lo: int, hi: int, sha256: str | None, counter: CorruptCounter | None
) -> Iterator[Sample]:
    """Samples [lo, hi) of a shard of `count` samples, read front to back; the corrupt policy on failure.

    Samples read before a fault were already validated and are kept; the ones not
    read count as lost. Reading stops at `hi` (the rest belongs to another reader).
    """
    seen = got = 0
    stream = None
    try:
        stream = open_url(url, cache_dir=spec.cache_dir, allow_pipe=spec.allow_pipe, sha256=sha256)
        samples = read_samples(
            stream,
            encoding=spec.encoding,
            image_size=spec.image_size,
            num_classes=spec.num_classes,
            masks=spec.masks,
            fast=spec.fast,
        )
        for sample in samples:
            if seen >= count:
                raise ShardFormatError(f"holds more samples than the manifest's {count}")
            if lo <= seen < hi:
                got += 1
                yield sample
            seen += 1
            if seen >= hi and hi < count:
                return
        if seen != count:
            raise ShardFormatError(f"holds {seen} samples, the manifest says {count}")
    except PermissionError:
        raise  # secure mode refusing a pipe: a configuration error, never a skippable shard
    except (ShardFormatError, OSError) as exc:
        skip_or_raise(spec, counter, url, (hi - lo) - got, exc)
    finally:
        if stream is not None:
            stream.close()
