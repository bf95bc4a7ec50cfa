"""Shared fixtures: tiny phantom datasets, made once per session."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests replay the same examples on every run and machine: a failure in CI reproduces locally.
settings.register_profile("radstream", derandomize=True, database=None)
settings.load_profile("radstream")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: this checkout first on the path, no GPU, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def phantom_raw(tmp_path_factory) -> Path:
    """A small phantom (12 films per class, seed 0) in the Kaggle layout; read-only for tests."""
    from sharding.phantom import PhantomSpec, generate

    out = tmp_path_factory.mktemp("phantom")
    return generate(out, PhantomSpec(counts=(12, 12, 12, 12), seed=0))


@pytest.fixture(scope="session")
def phantom_shards(phantom_raw, tmp_path_factory) -> Path:
    """Raw-encoded shards with masks of the small phantom (8 samples per shard); read-only for tests."""
    from sharding.build import build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards(phantom_raw, out, encoding="raw", include_masks=True, shard_size=8, workers=1, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Raw shards whose pixels encode each sample's index (tests/helpers/indexed_shards.py); read-only."""
    from helpers.indexed_shards import write_shards

    out = tmp_path_factory.mktemp("shards_raw")
    write_shards(out)
    return out


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """A folder served over HTTP by a real local server: (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
