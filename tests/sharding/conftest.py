"""Shard sets built once per session from the shared phantom fixture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sharding.build import build_shards


@pytest.fixture(scope="session")
def built_raw(phantom_raw, tmp_path_factory) -> Path:
    """Shards (raw encoding, no masks, shard size 8) of the 12-per-class phantom; read-only."""
    out = tmp_path_factory.mktemp("built") / "shards"
    build_shards(phantom_raw, out, shard_size=8, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def built_png_masks(phantom_raw, tmp_path_factory) -> Path:
    """Shards (png encoding, masks, shard size 8) of the 12-per-class phantom; read-only."""
    out = tmp_path_factory.mktemp("built_png") / "shards"
    build_shards(phantom_raw, out, encoding="png", include_masks=True, shard_size=8, workers=1, progress=False)
    return out


@pytest.fixture
def raw_copy(phantom_raw, tmp_path) -> Path:
    """A writable copy of the phantom dataset folder (for bad-input tests)."""
    target = tmp_path / "raw" / phantom_raw.name
    shutil.copytree(phantom_raw, target)
    return target
