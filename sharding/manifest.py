"""The shard manifest: schema, atomic write, load (refusing unknown versions).

`manifest.json` sits beside the shards and is written last. Readers (pipeline,
train) take class names, counts, image size and shard lists from here and
never from `len()` of a stream.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sharding.contract import ENCODINGS, SPLITS
from sharding.files import atomic_write

FORMAT_VERSION = 1
#: A shard name is a plain file name beside the manifest: no folders, `..`, quotes or shell characters,
#: so a manifest fetched from elsewhere can neither point outside its folder nor smuggle a command.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tar")
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or of an unknown version."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split."""

    name: str  # file name relative to the manifest's folder, e.g. train-000000.tar
    samples: int
    sha256: str
    bytes: int
    class_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class SplitInfo:
    """All shards of one split and their per-class sample counts."""

    shards: tuple[ShardInfo, ...]
    class_counts: tuple[int, ...]
    sources: dict = field(default_factory=dict)  # {source or "unknown": per-class counts}

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a shard set."""

    classes: tuple[str, ...]
    image_size: int
    encoding: str
    masks: bool
    seed: int
    splits: dict[str, SplitInfo]
    version: int = FORMAT_VERSION
    build: dict = field(default_factory=dict)  # options, source, tool versions
    skipped: tuple[dict, ...] = ()  # {"path": ..., "reason": ...}
    duplicate_groups: tuple[dict, ...] = ()  # {"kind": exact|near, "members": [...], "labels": [...]}
    mask_issues: tuple[dict, ...] = ()  # {"key", "path", "reason"}: sample kept, all-zero mask, json mask_missing
    counts: dict = field(default_factory=dict)  # {"scanned", "written", "skipped", "mask_issues"}

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"split {name!r} not in manifest; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str, base: str | Path) -> list[str]:
        """Shard locations for a split under `base` (a folder or a URL prefix)."""
        base = str(base)
        sep = "" if base.endswith("/") else "/"
        return [f"{base}{sep}{s.name}" for s in self.split(split).shards]

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(data: dict) -> Manifest:
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format version {version!r} is not supported (this radstream reads version "
                f"{FORMAT_VERSION}); rebuild the shards with `python -m sharding build --force`"
            )
        try:
            splits = {
                name: SplitInfo(
                    shards=tuple(
                        ShardInfo(**{**s, "class_counts": tuple(s.get("class_counts", ()))}) for s in info["shards"]
                    ),
                    class_counts=tuple(info["class_counts"]),
                    sources={k: list(v) for k, v in info.get("sources", {}).items()},
                )
                for name, info in data["splits"].items()
            }
            manifest = Manifest(
                classes=tuple(data["classes"]),
                image_size=int(data["image_size"]),
                encoding=data["encoding"],
                masks=bool(data["masks"]),
                seed=int(data["seed"]),
                splits=splits,
                version=version,
                build=data.get("build", {}),
                skipped=tuple(data.get("skipped", ())),
                duplicate_groups=tuple(data.get("duplicate_groups", ())),
                mask_issues=tuple(data.get("mask_issues", ())),
                counts=dict(data.get("counts", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc}") from None
        if manifest.encoding not in ENCODINGS:
            raise ManifestError(f"manifest encoding {manifest.encoding!r} unknown; expected one of {ENCODINGS}")
        for split, info in manifest.splits.items():
            for shard in info.shards:
                if not isinstance(shard.name, str) or not SHARD_NAME.fullmatch(shard.name) or ".." in shard.name:
                    raise ManifestError(
                        f"manifest split {split!r} lists an unsafe shard name {shard.name!r}: "
                        "shard names are plain file names like train-000000.tar"
                    )
        return manifest


def manifest_path(shards: str | Path) -> Path:
    """The manifest file of a shard folder (or the file itself)."""
    path = Path(shards)
    return path if path.name.endswith(".json") else path / MANIFEST_NAME


def shards_root(shards: str | Path) -> Path:
    """The folder holding the shards of `shards` (a shard folder or its manifest file)."""
    return manifest_path(shards).parent


def load_manifest(shards: str | Path) -> Manifest:
    """Read `<shards>/manifest.json`; ManifestError with a fix if it is missing or bad."""
    path = manifest_path(shards)
    if not path.exists():
        raise ManifestError(
            f"no shard manifest at {path}; build the shards first: "
            f"python -m sharding build --raw data/raw --out {path.parent}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    return Manifest.from_dict(data)


def write_manifest(manifest: Manifest, shards: str | Path) -> Path:
    """Write atomically: temp file, fsync, rename."""
    path = manifest_path(shards)
    atomic_write(path, lambda tmp: tmp.write_text(manifest.to_json()))
    return path


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "SplitInfo",
    "SPLITS",
    "load_manifest",
    "shards_root",
    "manifest_path",
    "write_manifest",
]
