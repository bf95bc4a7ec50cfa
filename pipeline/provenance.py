"""Where each sample came from, read from its json member together with its pixels.

Every sample's json (written by `sharding.encode`) names its source (the site or
collection), the sha256 of its stored pixels, its perceptual hash (stored since
build version 3) and its input path. The readers parse it while they read the
pixels, so a batch and the predictions made from it carry their provenance and
nothing has to read a shard a second time to ask where a film came from.
"""

from __future__ import annotations

import json
from typing import NamedTuple

#: The source of a film whose json names none.
UNKNOWN = "unknown"


class Provenance(NamedTuple):
    """One sample's origin, from its json member."""

    source: str  # the site or collection it came from; UNKNOWN when the build had none
    sha256: str  # hex sha256 of the stored pixels; "" when the json has none
    phash: int | None  # 256-bit DCT hash of the stored pixels (sharding.dedup.phash); None before build v3
    path: str  # the input file it was built from, relative to the build's input; "" when unknown


#: The provenance of a sample without a readable json member.
NONE = Provenance(UNKNOWN, "", None, "")


def from_meta(meta: dict) -> Provenance:
    """Provenance from a parsed sample json."""
    stored = meta.get("phash")
    return Provenance(
        str(meta.get("source") or UNKNOWN),
        str(meta.get("sha256") or ""),
        int(stored, 16) if isinstance(stored, str) and stored else None,
        str(meta.get("path") or ""),
    )


def from_json(payload: bytes | memoryview) -> Provenance:
    """Provenance from a json member's bytes; a json that cannot be parsed gives NONE (the json is not
    part of the training contract: a shard from another writer may carry anything there)."""
    try:
        meta = json.loads(bytes(payload))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return NONE
    return from_meta(meta) if isinstance(meta, dict) else NONE


__all__ = ["NONE", "UNKNOWN", "Provenance", "from_json", "from_meta"]
