"""Fixtures: tiny shard sets from `indexed_shards` (pixels encode the sample index)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.indexed_shards import write_shards


@pytest.fixture(scope="session")
def tiny_png_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards_png")
    write_shards(out, encoding="png")
    return out
