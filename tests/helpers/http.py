"""A real local HTTP server over a folder that counts the requests per path (and can answer slowly)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    counts: Counter
    delay_s: float = 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.counts[self.path] += 1
        time.sleep(self.delay_s)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path, delay_s: float = 0.0) -> Iterator[tuple[str, Counter]]:
    """(base URL ending in '/', GET counts by path) for a server of `root` on 127.0.0.1, stopped after."""
    counts: Counter = Counter()
    handler_cls = type("Handler", (_CountingHandler,), {"counts": counts, "delay_s": delay_s})
    handler = functools.partial(handler_cls, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", counts
    finally:
        server.shutdown()
        server.server_close()
