"""Shard collections: one or several shard sets read as one split, with one label space.

A collection is a shard set (a folder or URL prefix with its manifest.json), a name (default: the
folder's name) and a weight (its share of each training epoch, `pipeline.mix`). `data.shards` in a
run config and `build_loader(shards=...)` take either one path or a list such as

    [{path: shards/covid19, weight: 1.0}, {path: shards/hospital_a, weight: 0.5, name: site_a}]

In a mixed set a sample's key is `collection/key` (names are unique, keys only within a collection).
Classes are matched by name: the label space is `classes` when given, else the first collection's
classes; a collection may lack classes, and a class no name matches is an error naming it. Samples
are numbered collection by collection in list order, each collection in its manifest's order.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.fast_tar import ShardFormatError
from pipeline.read import ShardRef, load_shard_manifest, split_digest, split_shards
from pipeline.resume import LoaderError
from pipeline.urls import local_path
from sharding.manifest import Manifest


class CollectionError(LoaderError):
    """The collections cannot be read together (names, weights, classes, formats); the message says why."""


@dataclass(frozen=True)
class Collection:
    """One shard set of a run and its share of each training epoch."""

    name: str  # how metrics, reports and loader states name it
    shards: str  # folder or URL prefix holding manifest.json
    weight: float = 1.0  # relative share of each training epoch's draws (> 0)


def default_name(shards: str) -> str:
    """A collection's name from its folder or URL: the last path part, in safe characters."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(shards).rstrip("/").rsplit("/", 1)[-1]).strip("._")
    return name or "shards"


def parse(spec: str | Path | Collection | Sequence) -> list[Collection]:
    """Collections from a path, or a list of paths, dicts (`path`, `weight`, `name`) or `Collection`s."""
    items = [spec] if isinstance(spec, (str, Path, Collection)) else list(spec)
    if not items:
        raise CollectionError("no collection given: name at least one shard folder or URL")
    out = [_one(item, i) for i, item in enumerate(items)]
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CollectionError(f"collection names must differ; {twice} appear more than once: give each a `name`")
    return out


def _one(item, i: int) -> Collection:
    if isinstance(item, Collection):
        return _checked(item, i)
    if isinstance(item, (str, Path)):
        return Collection(default_name(str(item)), str(item))
    if not hasattr(item, "get") or not item.get("path"):
        raise CollectionError(f"collection {i}: {item!r} needs a `path` (a shard folder or URL)")
    unknown = sorted(set(item) - {"path", "weight", "name"})
    if unknown:
        raise CollectionError(f"collection {i}: unknown keys {unknown} (known: path, weight, name)")
    try:
        weight = float(item.get("weight", 1.0))
    except (TypeError, ValueError):
        raise CollectionError(f"collection {i}: weight {item.get('weight')!r} is not a number") from None
    path = str(item["path"])
    return _checked(Collection(str(item.get("name") or default_name(path)), path, weight), i)


def _checked(c: Collection, i: int) -> Collection:
    if not (math.isfinite(c.weight) and c.weight > 0):
        raise CollectionError(f"collection {c.name!r}: weight must be a finite number > 0, got {c.weight}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", c.name):
        raise CollectionError(f"collection {i}: name {c.name!r} may hold only letters, digits, '.', '_' and '-'")
    return c


@dataclass
class CollectionSet:
    """Several shard sets read as one: their manifests, the shared label space, and each one's place."""

    collections: list[Collection]
    manifests: list[Manifest]
    classes: list[str]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.collections]

    @property
    def mixed(self) -> bool:
        return len(self.collections) > 1

    @property
    def manifest(self) -> Manifest:
        """The first collection's manifest (image size, encoding and masks are the same in all)."""
        return self.manifests[0]

    @property
    def masks(self) -> bool:
        return all(m.masks for m in self.manifests)

    def luts(self) -> np.ndarray:
        """int64 [collections, max classes]: a collection's label index -> the shared one (-1 past its classes)."""
        width = max(len(m.classes) for m in self.manifests)
        out = np.full((len(self.manifests), width), -1, np.int64)
        for i, m in enumerate(self.manifests):
            out[i, : len(m.classes)] = [self.classes.index(c) for c in m.classes]
        return out

    def in_shared_space(self, table, sizes: Sequence[int]):
        """A global-plan `SampleTable` (samples numbered collection by collection) with its labels in the shared
        label space and, in a mixed set, its keys as `collection/key`: mapped once, not per batch."""
        which = np.repeat(np.arange(len(sizes)), sizes)
        labels = np.asarray(table.labels, np.int64)
        mapped = np.where(labels < 0, -1, self.luts()[which, np.maximum(labels, 0)])  # -1: an unreadable shard
        if ((mapped < 0) & (labels >= 0)).any():
            raise ShardFormatError("a label past its collection's classes in the train shards")
        keys = [f"{self.names[c]}/{k}" for c, k in zip(which.tolist(), table.keys)] if self.mixed else table.keys
        return replace(table, labels=mapped, keys=keys)

    def label(self, batches: Iterator[Batch], offsets: np.ndarray, pin: bool, mapped: bool = False) -> Iterator[Batch]:
        """Loader batches with their labels in the shared label space, each sample's collection name and, in a
        mixed set, keys as `collection/key` (keys are unique within a collection only). `offsets`: the first
        split index of each collection; `mapped`: labels and keys are already (`in_shared_space`)."""
        luts, names = self.luts(), np.array(self.names, dtype=object)
        prefixes = np.array([f"{n}/" for n in self.names], dtype=object)
        identity = not self.mixed and bool((luts[0] == np.arange(luts.shape[1])).all())
        for batch in batches:  # vectorised: this runs in the main process, once per batch
            if not self.mixed:
                batch.collections = [self.names[0]] * len(batch)
            else:
                which = np.searchsorted(offsets, batch.indices.numpy(), side="right") - 1
                batch.collections = names[which].tolist()
            if not (mapped or identity):
                which = np.searchsorted(offsets, batch.indices.numpy(), side="right") - 1
                labels = luts[which, batch.labels.numpy()]
                if (labels < 0).any():
                    raise ShardFormatError(f"a label past its collection's classes in {batch.keys}")
                batch.labels = torch.from_numpy(labels).pin_memory() if pin else torch.from_numpy(labels)
                if self.mixed:
                    batch.keys = (prefixes[which] + np.array(batch.keys, dtype=object)).tolist()
            yield batch

    def check_split(self, split: str, train: bool, masks: bool | None) -> None:
        """Refuse `masks=True` where a collection has none, and a training split some collection lacks."""
        for c, m in zip(self.collections, self.manifests):
            if masks and not m.masks:
                raise CollectionError(
                    f"masks=True but collection {c.name!r} has no masks (rebuild with --include-masks)"
                )
            if train and m.split(split).samples == 0:
                raise CollectionError(
                    f"split {split!r} of collection {c.name!r} ({c.shards}) has no samples: rebuild its shards from "
                    "more images" + (", or leave it out of the mix" if self.mixed else "")
                )

    def counts(self, split: str) -> list[list[int]]:
        """Per collection, its shards' sample counts in `split`."""
        return [[s.samples for s in m.split(split).shards] for m in self.manifests]

    def sizes(self, split: str) -> list[int]:
        return [m.split(split).samples for m in self.manifests]

    def samples(self, split: str) -> int:
        return sum(self.sizes(split))

    def class_counts(self, split: str) -> tuple[int, ...]:
        """Films per class of the shared label space in `split`, all collections together."""
        out = [0] * len(self.classes)
        for m in self.manifests:
            for name, count in zip(m.classes, m.split(split).class_counts):
                out[self.classes.index(name)] += int(count)
        return tuple(out)

    def urls(self, split: str) -> list[str]:
        """Every shard of `split`, collection by collection."""
        out = []
        for c, m in zip(self.collections, self.manifests):
            base = local_path(c.shards)
            out += m.shard_urls(split, str(base) if base is not None else c.shards)
        return out

    def split_shards(self, split: str, verify: bool = True) -> list[ShardRef]:
        """`pipeline.read.split_shards` of every collection; in a mixed set each names its collection."""
        out = []
        for c, m in zip(self.collections, self.manifests):
            refs = split_shards(m, c.shards, split, verify) if split in m.splits else []
            out += [replace(r, collection=c.name) for r in refs] if self.mixed else refs
        return out

    def sha256(self, split: str) -> list[str]:
        return [s.sha256 for m in self.manifests for s in m.split(split).shards]

    def shard_collection(self, split: str) -> np.ndarray:
        """int64 [shards]: the collection of each shard of `split`."""
        return np.repeat(np.arange(len(self.manifests)), [len(m.split(split).shards) for m in self.manifests])

    def digest(self, split: str) -> str:
        """What a loader state belongs to: one collection's split digest, or all of them with names and weights."""
        if not self.mixed:
            return split_digest(self.manifest, split)
        parts = [[c.name, c.weight, split_digest(m, split)] for c, m in zip(self.collections, self.manifests)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def describe(self) -> list[dict]:
        """The resolved mix, for config.yaml and the model card."""
        return [
            {"name": c.name, "path": c.shards, "weight": c.weight, "train": m.split("train").samples}
            for c, m in zip(self.collections, self.manifests)
        ]


def open_collections(
    spec: str | Path | Collection | Sequence,
    classes: Sequence[str] | None = None,
    manifests: Sequence[Manifest] | None = None,
) -> CollectionSet:
    """Read each collection's manifest and check that they can be read as one (see the module docstring)."""
    collections = parse(spec)
    if manifests is None:
        manifests = [load_shard_manifest(c.shards) for c in collections]
    manifests = list(manifests)
    if len(manifests) != len(collections):
        raise CollectionError(f"{len(manifests)} manifests given for {len(collections)} collections")
    label_space = list(classes) if classes else list(manifests[0].classes)
    problems = []
    for c, m in zip(collections, manifests):
        unmatched = [k for k in m.classes if k not in label_space]
        if unmatched:
            problems.append(
                f"collection {c.name!r} ({c.shards}) has classes {unmatched} that match none of {label_space}: "
                "rename them in its build, or list every class in data.classes"
            )
    first = manifests[0]
    for c, m in zip(collections[1:], manifests[1:]):
        for what in ("image_size", "encoding"):
            if getattr(m, what) != getattr(first, what):
                problems.append(
                    f"collection {c.name!r} has {what} {getattr(m, what)!r} but {collections[0].name!r} has "
                    f"{getattr(first, what)!r}: rebuild one so they match (`python -m sharding build`)"
                )
    if len(set(label_space)) != len(label_space):
        problems.append(f"classes {label_space} name a class twice")
    if problems:
        raise CollectionError("; ".join(problems))
    return CollectionSet(collections, manifests, label_space)


__all__ = ["Collection", "CollectionError", "CollectionSet", "default_name", "open_collections", "parse"]
