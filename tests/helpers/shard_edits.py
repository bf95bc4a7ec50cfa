"""Edits of built shards that keep the manifest consistent (so only the edit itself is wrong)."""

from __future__ import annotations

import dataclasses
import json

from sharding.manifest import load_manifest, write_manifest
from sharding.verify import iter_samples
from sharding.writer import write_shard


def rewrite_samples(root, split: str, edit, shard: int = 0) -> None:
    """Rewrite one shard of `split` as `edit(its samples)` ({"__key__", ext: bytes} dicts, written in order), with
    its new sha256 and size in the manifest and everything else the manifest says left as it was."""
    m = load_manifest(root)
    info = m.split(split).shards[shard]
    samples = edit(list(iter_samples(root / info.name)))
    labels = [int(s["cls"]) for s in samples if s.get("cls", b"").isdigit()]
    written = write_shard(root / info.name, samples, num_classes=max([len(m.classes), *(x + 1 for x in labels)]))
    shards = list(m.split(split).shards)
    shards[shard] = dataclasses.replace(info, sha256=written.sha256, bytes=written.bytes)
    splits = dict(m.splits)
    splits[split] = dataclasses.replace(m.split(split), shards=tuple(shards))
    write_manifest(dataclasses.replace(m, splits=splits), root)


def rewrite_json(root, split: str, change) -> None:
    """Rewrite `split`'s first shard with each sample json passed through `change`, re-hashed into the manifest."""
    m = load_manifest(root)
    first = m.split(split).shards[0]
    samples = [
        {**s, "json": json.dumps(change(json.loads(s["json"]))).encode()} for s in iter_samples(root / first.name)
    ]
    info = write_shard(root / first.name, samples, num_classes=len(m.classes))
    splits = dict(m.splits)
    splits[split] = dataclasses.replace(m.split(split), shards=(info, *m.split(split).shards[1:]))
    write_manifest(dataclasses.replace(m, splits=splits), root)
