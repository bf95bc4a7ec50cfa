"""Fixtures: tiny shard sets from `indexed_shards` (pixels encode the sample index), a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from helpers.indexed_shards import write_shards


@pytest.fixture(scope="session")
def tiny_png_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards_png")
    write_shards(out, encoding="png")
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
