"""What the real-process training tests share: the tiny-run overrides and a free local port."""

from __future__ import annotations

import os
import random
import socket
import sys
import time

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
    """A TCP port nothing listens on right now (for a launcher's rendezvous), below Linux's ephemeral range.

    A port the kernel hands out for bind(0) comes from the ephemeral range, where any outgoing connection (the
    suite's gloo ranks make many) may take it as its source port before the launcher listens on it; a port
    below 32768 is never taken that way.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all interfaces, as the rendezvous store binds
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32767")


def train_cmd(nproc: int = 1) -> list[str]:
    """`accelerate launch train/main.py --config configs/demo.yaml` + TINY on `nproc` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += ["--mixed_precision", "no"]
    if nproc == 1:
        cmd += ["--cpu", "--num_processes", "1"]
    else:
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    return cmd + ["train/main.py", "--config", "configs/demo.yaml"] + TINY
