"""What the real-process training tests share: the tiny-run overrides and a free local port."""

from __future__ import annotations

import socket

#: Overrides that make `configs/demo.yaml` a seconds-long run on the tiny phantom (32 px, small batches).
TINY = [
    "data.image_size=32",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "train.batch_size=8",
    "eval.batch_size=16",
    "logging.progress=false",
    "eval.gradcam_per_class=1",
    "train.log_every=1",
]


def free_port() -> int:
    """A TCP port nothing listens on right now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
